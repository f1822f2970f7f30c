"""Planning before launch (`segr1 plan`): model shapes, the memory plan of every pool and its report.

- model_shapes.py: parameter shapes of the policy and SAM2, read from their config files (no weights loaded);
- memory.py:       bytes per GPU of the learner, rollout and reward actors, and the object store per node;
- report.py:       `segr1 plan`'s table and JSON, and docs/learner.md's memory table.

Imported only by the commands, the tests and bench/ (an import-linter contract).
"""
