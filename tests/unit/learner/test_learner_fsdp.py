"""The sharded learner (FSDP2 over a real gloo group of 2 processes, torch.multiprocessing spawn, no Ray) against
the plain 1-rank learner on the same start weights and batches: the updated weights are equal within float32
tolerance (one update per batch, three updates per batch with a rank that has an empty micro-batch, LoRA);
every rank returns the same StepStats; episodes of two turns (two images in a row, the logits at the answers only)
step alike; rank 0's weight-sync sender sends the gathered weights bucket by bucket;
a checkpoint or a send that fails on rank 0 alone raises without leaving rank 1 in a collective; a checkpoint written by 2 ranks loads into 1 rank and one written by 1
rank into 2, with the same weights and optimiser state, and the next step equals the uninterrupted one."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as tmp
from safetensors.torch import load_file, save_file

from cluster.data.synth import generate_samples
from learner.learner import Learner
from runtime.weights.inprocess import InProcessChannel
from tests.support.synthetic import episode_groups, scored_groups

torch.set_num_threads(2)
TOL = {"rtol": 1e-5, "atol": 2e-6}


def _cfg(policy_dir: str, root: str, updates: int = 1, mbs: int = 2, **learner):
    from tests.unit.learner.test_learner import make_cfg

    cfg = make_cfg(Path(policy_dir), grpo={"updates_per_batch": updates}, micro_batch_size=mbs, **learner)
    return cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"dir": root})})


def _optimizer_tensors(learner: Learner) -> dict[str, torch.Tensor]:
    """The optimiser state as full tensors under FQN keys (a collective under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    sd = get_optimizer_state_dict(learner.policy.model, learner.optimizer)
    out = {}
    for fqn, entry in sd["state"].items():
        for key, v in entry.items():
            v = v.full_tensor() if hasattr(v, "full_tensor") else v
            out[f"{fqn}/{key}"] = v.detach().cpu().float().reshape(-1).clone()
    return out


def _rank(rank: int, port: int, policy_dir: str, out: str, batches, episodes) -> None:
    """One rank of the 2-rank group: a fresh learner's two steps (weights, stats, a checkpoint after the first),
    then a learner resumed from the 1-rank checkpoint and its next step, then three updates per batch."""
    torch.set_num_threads(1)
    init, out = f"tcp://127.0.0.1:{port}", Path(out)
    (s1, g1), (s2, g2) = batches

    def save(name, tensors):
        if rank == 0:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"{name}.safetensors"))

    a = Learner(_cfg(policy_dir, str(out / "ckpt2")).learner_spec(), rank, 2, init)
    stats = [a.step(g1, *s1).model_dump()]
    save("two_w1", a.export_weights())
    save("two_opt1", _optimizer_tensors(a))
    a.save_checkpoint(data_cursor={"at": 1})
    stats.append(a.step(g2, *s2).model_dump())
    save("two_w2", a.export_weights())
    channel = InProcessChannel(bucket_mb=0.25)  # several buckets; rank 0's sender, both ranks gather
    if rank == 0:
        a._sender, a._sender_backend, receiver = channel.sender(), "inprocess", channel.receiver()
    sent = a.broadcast_weights()
    if rank == 0:
        version, named = receiver.receive(timeout=60)
        save("two_sent", dict(named))  # the stream's bucket views, each bucket's buffer kept alive by them
        stats.append({"sent_version": version, "buckets": sent["buckets"]})
    else:
        stats.append({"sent": sent})
    (out / "a-file").write_text("")  # a checkpoint root that cannot be a folder: rank 0 fails, both raise
    failures = [_raised(lambda: a.save_checkpoint(root=str(out / "a-file")))]
    a._sender = None  # a send that fails on rank 0: rank 1 still finishes its gathers, nobody hangs
    failures.append(_raised(a.broadcast_weights))
    stats.append({"failures": failures})
    b = Learner(_cfg(policy_dir, str(out / "ckpt1")).learner_spec(), rank, 2, init)
    state = b.load_checkpoint()  # written by the 1-rank learner
    save("from1_w1", b.export_weights())
    save("from1_opt1", _optimizer_tensors(b))
    stats.append({"resumed_step": b.step_count, "cursor": state["data_cursor"]})
    b.step(g2, *s2)
    save("from1_w2", b.export_weights())
    c = Learner(_cfg(policy_dir, str(out / "ckpt3"), updates=3, mbs=1).learner_spec(), rank, 2, init)
    stats.append(c.step(g1, *s1).model_dump())
    save("two_u3", c.export_weights())
    d = Learner(_cfg(policy_dir, str(out / "ckpt4"), lora_rank=4).learner_spec(), rank, 2, init)
    d.step(g1, *s1)
    save("two_lora", d.export_weights())
    e = Learner(_cfg(policy_dir, str(out / "ckpt5")).learner_spec(), rank, 2, init)
    stats.append(e.step(*_args(episodes)).model_dump())
    save("two_episodes", e.export_weights())
    (out / f"stats{rank}.json").write_text(json.dumps(stats))


def _raised(fn) -> str:
    """The type of the error fn() raised; a checkpoint's error also says whether it names rank 0's cause."""
    try:
        fn()
    except Exception as err:
        named = "FileExistsError" in str(err) and "a-file/step-000002 was not written" in str(err)
        return type(err).__name__ + (" naming rank 0's FileExistsError" if named else "")
    return "returned"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tiny_policy_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    policy_dir = str(tiny_policy_dir)
    one = Learner(_cfg(policy_dir, str(out / "ckpt1")).learner_spec())
    samples = [list(generate_samples(2, seed=k, size=64)) for k in (0, 1)]
    batches = [
        (s, scored_groups(one.policy, s, group_size=4, seed=k, max_tokens=24)) for k, s in enumerate(samples)
    ]
    more = list(generate_samples(2, seed=2, size=64))
    episodes = (more, episode_groups(one.policy, more, group_size=4, seed=2, max_tokens=16))
    ref = {"stats1": one.step(*_args(batches[0])).model_dump()}
    ref["w1"], ref["opt1"] = one.export_weights(), _optimizer_tensors(one)
    one.save_checkpoint(data_cursor={"at": 1})
    ref["stats2"] = one.step(*_args(batches[1])).model_dump()
    ref["w2"] = one.export_weights()
    u3 = Learner(_cfg(policy_dir, str(out / "ckpt3"), updates=3, mbs=1).learner_spec())
    ref["stats_u3"] = u3.step(*_args(batches[0])).model_dump()
    ref["u3"] = u3.export_weights()
    lora = Learner(_cfg(policy_dir, str(out / "ckpt4"), lora_rank=4).learner_spec())
    lora.step(*_args(batches[0]))
    ref["lora"] = lora.export_weights()
    ep = Learner(_cfg(policy_dir, str(out / "ckpt5")).learner_spec())
    ref["stats_episodes"] = ep.step(*_args(episodes)).model_dump()
    ref["episodes"] = ep.export_weights()
    tmp.spawn(_rank, args=(_free_port(), policy_dir, str(out), batches, episodes), nprocs=2, join=True)
    return out, ref, batches


def _args(batch):
    samples, groups = batch
    return (groups, *samples)


def _assert_weights_close(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name, t in want.items():
        torch.testing.assert_close(got[name], t, **TOL, msg=name)


def test_two_ranks_step_equals_one_rank_and_ranks_agree(runs):
    out, ref, _ = runs
    s0, s1 = (json.loads((out / f"stats{r}.json").read_text()) for r in (0, 1))
    for a, b in zip(
        s0, s1, strict=True
    ):  # every rank: the same figures (the weight-sync and failure entries aside)
        assert {"sent", "failures"} & set(b) or {k: v for k, v in a.items() if k != "step_s"} == {
            k: v for k, v in b.items() if k != "step_s"
        }
    assert s0[0]["step_s"] == s1[0]["step_s"]
    assert s0[2] == {"sent_version": 2, "buckets": s0[2]["buckets"]} and s0[2]["buckets"] > 1
    assert s1[2] == {"sent": {}}  # only rank 0 sends; rank 1 took part in the gathers
    # a local failure on rank 0 is raised on both ranks and leaves the group in step (the steps after it ran)
    named = "CheckpointError naming rank 0's FileExistsError"  # rank 1's quotes rank 0's (learner.sharding.together)
    assert s0[3] == {"failures": [named, "RuntimeError"]}
    assert s1[3] == {"failures": [named, "returned"]}
    sent, w2 = load_file(str(out / "two_sent.safetensors")), load_file(str(out / "two_w2.safetensors"))
    assert set(sent) == set(w2) and all(torch.equal(sent[n], w2[n]) for n in w2)
    _assert_weights_close(load_file(str(out / "two_w1.safetensors")), ref["w1"])
    _assert_weights_close(load_file(str(out / "two_w2.safetensors")), ref["w2"])
    _assert_weights_close(load_file(str(out / "two_u3.safetensors")), ref["u3"])
    _assert_weights_close(load_file(str(out / "two_lora.safetensors")), ref["lora"])
    _assert_weights_close(load_file(str(out / "two_episodes.safetensors")), ref["episodes"])
    pairs = (
        (s0[0], ref["stats1"]),
        (s0[1], ref["stats2"]),
        (s0[5], ref["stats_u3"]),
        (s0[6], ref["stats_episodes"]),
    )
    assert ref["stats_episodes"]["num_tokens"] > 0 and ref["episodes"] != {}
    for got, want in pairs:
        for key in ("loss", "grad_norm", "kl", "entropy", "ratio_mean", "num_tokens", "is_weight_mean"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
        assert got["num_updates"] == want["num_updates"] and got["policy_version"] == want["policy_version"]
    assert ref["w1"] != {} and any(not torch.equal(ref["w1"][n], ref["w2"][n]) for n in ref["w1"])


def test_checkpoint_of_one_rank_resumes_in_two_and_of_two_in_one(runs, tiny_policy_dir):
    out, ref, batches = runs
    s0 = json.loads((out / "stats0.json").read_text())
    assert s0[4] == {"resumed_step": 1, "cursor": {"at": 1}}
    _assert_weights_close(load_file(str(out / "from1_w1.safetensors")), ref["w1"])
    _assert_weights_close(load_file(str(out / "from1_opt1.safetensors")), ref["opt1"])
    _assert_weights_close(load_file(str(out / "from1_w2.safetensors")), ref["w2"])  # next step: uninterrupted
    # written by 2 ranks (DCP shards of both), loaded by 1
    ckpt2 = out / "ckpt2" / "step-000001"
    assert len(list((ckpt2 / "optimizer").glob("*.distcp"))) == 2
    one = Learner(_cfg(str(tiny_policy_dir), str(out / "ckpt2")).learner_spec())
    state = one.load_checkpoint(str(ckpt2))
    assert (one.step_count, state["data_cursor"], state["world_size"]) == (1, {"at": 1}, 2)
    _assert_weights_close(one.export_weights(), ref["w1"])
    _assert_weights_close(_optimizer_tensors(one), ref["opt1"])
    one.step(*_args(batches[1]))
    _assert_weights_close(one.export_weights(), load_file(str(out / "two_w2.safetensors")))
