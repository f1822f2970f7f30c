"""What `make demo` and the tests run on with no network: tiny models built offline and the demo job.

- tiny_models.py: a tiny Qwen2.5-VL policy, tokenizer and processor, a tiny SAM2, written to a folder;
- demo.py:        `python -m cluster.dev.demo`: synthetic data, SFT, evaluation, RL, evaluation, pictures;
- report.py:      what the demo prints: one line per phase (the RL bar read from metrics.jsonl) and the summary.

Imported only by the commands, the tests and bench/ (an import-linter contract).
"""
