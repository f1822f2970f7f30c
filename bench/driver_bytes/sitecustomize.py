"""A measuring hook, not part of the project: with SEGR1_BYTES_OUT set and this folder on PYTHONPATH, every
Python process of a run imports it, and in the Ray actor named `driver` it tallies the pickled size of
- every value `ray.get` returns (what the driver deserialises: get_bytes),
- every actor call's by-value arguments (what it serialises per call, refs excluded: sent_bytes),
- every `ray.put` (put_bytes),
rewriting $SEGR1_BYTES_OUT.<pid>.json after each. Pickling every value costs time: measure bytes and speed in
separate runs. bench/compare_commits.sh uses it; the figures are in docs/benchmarks.md."""

import os

if os.environ.get("SEGR1_BYTES_OUT"):
    import json
    import pickle

    import ray
    import ray.actor

    _tally = {
        "get_bytes": 0,
        "get_calls": 0,
        "sent_bytes": 0,
        "sent_calls": 0,
        "put_bytes": 0,
        "put_calls": 0,
    }
    _state = {"driver": None}

    def _in_driver() -> bool:
        if _state["driver"] is None:
            try:
                _state["driver"] = ray.get_runtime_context().get_actor_name() == "driver"
            except Exception:
                return False
        return _state["driver"]

    def _count(kind: str, value) -> None:
        try:
            size = len(pickle.dumps(value, protocol=5))
        except Exception:
            size = 0
        _tally[f"{kind}_bytes"] += size
        _tally[f"{kind}_calls"] += 1
        with open(f"{os.environ['SEGR1_BYTES_OUT']}.{os.getpid()}.json", "w") as f:
            json.dump(_tally, f)

    _get, _put, _remote = ray.get, ray.put, ray.actor.ActorMethod._remote

    def get(refs, *a, **k):
        out = _get(refs, *a, **k)
        if _in_driver():
            _count("get", out)
        return out

    def put(value, *a, **k):
        if _in_driver():
            _count("put", value)
        return _put(value, *a, **k)

    def remote(self, args=None, kwargs=None, **options):
        if _in_driver():
            _count("sent", ([a for a in (args or ()) if not isinstance(a, ray.ObjectRef)], kwargs or {}))
        return _remote(self, args=args, kwargs=kwargs, **options)

    ray.get, ray.put, ray.actor.ActorMethod._remote = get, put, remote
