"""cluster.config: loading, overrides, and errors that name the field."""

from __future__ import annotations

import pytest
import yaml

from cluster.cli import main
from cluster.config import ConfigError, TrainConfig, apply_overrides, load_config
from tests.support.paths import REPO

CONFIG_DIR = REPO / "cluster" / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


def test_defaults_validate():
    cfg = load_config(None)
    assert cfg.grpo.group_size == 4 and cfg.grpo.beta == 0.04


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    assert isinstance(load_config(path), TrainConfig)


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        None, ["grpo.group_size=8", "learner.lr=3e-6", "data.eval=null", "rollout.resources.num_gpus=0.5"]
    )
    assert cfg.grpo.group_size == 8 and cfg.learner.lr == 3e-6 and cfg.data.eval is None
    assert cfg.rollout.resources.num_gpus == 0.5


def test_group_size_one_is_rejected_with_reason():
    with pytest.raises(ConfigError, match=r"grpo\.group_size: .*learn nothing"):
        load_config(None, ["grpo.group_size=1"])


def test_unknown_field_is_named():
    with pytest.raises(ConfigError, match=r"grpo\.gruop_size: unknown field"):
        load_config(None, ["grpo.gruop_size=8"])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["grpo.group_size"])


def test_segmenter_path_required_for_sam2():
    with pytest.raises(ConfigError, match="segmenter_path"):
        load_config(None, ["reward.segmenter=hf-sam2"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def _dry_run(argv: list[str], capsys) -> tuple[dict, str]:
    """(the resolved config, the rendered-prompts block) that `segr1 train --dry-run` prints."""
    from cluster.commands.train import PROMPTS_HEADER

    assert main(["train", *argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    config, sep, prompts = out.partition(PROMPTS_HEADER)
    assert sep, "the dry run printed no prompts"
    return yaml.safe_load(config), sep + prompts


def test_cli_dry_run_prints_resolved_config(tmp_path, capsys):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"grpo": {"group_size": 6}}))
    resolved, _ = _dry_run(["--config", str(cfg_file), "seed=7"], capsys)
    assert resolved["grpo"]["group_size"] == 6 and resolved["seed"] == 7
    assert resolved["prompt"]["preset"] == "seg-r1"  # the default of every config meant for real models


def test_dry_run_prints_the_references_rl_prompt_verbatim(capsys):
    from tests.unit.protos.test_prompting import REF_EVAL_SYSTEM, REF_EVAL_USER, REF_RL_SYSTEM, REF_RL_USER

    resolved, prompts = _dry_run(["--config", str(CONFIG_DIR / "seg-r1-rl.yaml")], capsys)
    assert resolved["prompt"]["preset"] == "seg-r1"
    assert f"# --8<-- train system\n{REF_RL_SYSTEM}\n# -->8--\n" in prompts
    assert (
        f"('Identify and segment all the primary objects in the image.')\n{REF_RL_USER}\n# -->8--\n"
        in prompts
    )
    assert f"# --8<-- eval system\n{REF_EVAL_SYSTEM}\n# -->8--\n" in prompts
    assert f"{REF_EVAL_USER}\n# -->8--\n" in prompts
    assert "\nIdentify and segment <expression>\n# -->8--" in prompts


def test_dry_run_of_prerl_prints_no_system_prompt_and_the_points_text(capsys):
    from tests.unit.protos.test_prompting import REF_PRERL_USER

    _, prompts = _dry_run(["--config", str(CONFIG_DIR / "seg-r1-prerl.yaml")], capsys)
    assert "# train system: none (no system message" in prompts
    assert f"\n{REF_PRERL_USER}\n# -->8--\n" in prompts


def test_dry_run_of_the_demo_renders_the_compact_prompt(capsys):
    from protos.answer import SYSTEM_PROMPT_FULL

    resolved, prompts = _dry_run(["--config", str(CONFIG_DIR / "demo.yaml")], capsys)
    assert resolved["prompt"]["preset"] == "compact"
    assert f"# --8<-- train system\n{SYSTEM_PROMPT_FULL}\n# -->8--\n" in prompts
    user = (
        "Identify and segment all the primary objects in the image. Output format: <think> ... </think> "
        "<bbox>[x1,y1,x2,y2]</bbox>, <points>[[x,y],[x,y],...]</points>, <labels>[1,0,...]</labels>. "
        "Coordinates are absolute integer pixels of the 56x56 image."
    )
    assert f"\n{user}\n# -->8--\n" in prompts
    assert "A conversation between User and Assistant" not in prompts


def test_policy_spec_carries_the_prompts_of_its_phase():
    from protos.answer import COMPACT, SEG_R1_EVAL, SEG_R1_TRAIN

    cfg = load_config(None)
    assert cfg.policy_spec().prompt == SEG_R1_TRAIN and cfg.policy_spec("eval").prompt == SEG_R1_EVAL
    demo = load_config(CONFIG_DIR / "demo.yaml")
    assert demo.policy_spec().prompt == COMPACT == demo.policy_spec("eval").prompt
    custom = load_config(None, ["prompt.preset=compact", "prompt.eval.system=Be brief."])
    assert custom.policy_spec("eval").prompt.system == "Be brief."
    assert custom.policy_spec().prompt.system == COMPACT.system
    with pytest.raises(ConfigError, match=r"prompt: .*prompt\.referring has no \{instruction\}"):
        load_config(None, ["prompt.referring=Segment it."])


def _reference_values(name: str) -> dict:
    """The values the reference's scripts give (scripts/run_grpo.sh, run_prerl.sh, run_grpo_sod.sh; eval/*.py):
    groups per step 6 processes x 1 prompt x 4 accumulation = 24; steps = ceil(epochs x images / 24)."""
    common = {
        ("grpo", "group_size"): 4,
        ("grpo", "batch_size"): 24,
        ("grpo", "beta"): 0.04,
        ("learner", "lr"): 1.0e-6,
        ("learner", "schedule"): "constant",
        ("learner", "micro_batch_size"): 4,
        ("learner", "num_gpus"): 6,
        ("data", "image_size"): 768,
        ("eval", "max_tokens"): {"foreground": 1024, "referring": 512, "reasoning": 512},
    }
    per_stage = {
        "seg-r1-prerl.yaml": {("rollout", "sampling", "max_tokens"): 256, ("grpo", "steps"): 125},
        "seg-r1-rl.yaml": {("rollout", "sampling", "max_tokens"): 400, ("grpo", "steps"): 337},
        "seg-r1-sod.yaml": {("rollout", "sampling", "max_tokens"): 400, ("grpo", "steps"): 440},
    }
    return {**common, **per_stage[name]}


@pytest.mark.parametrize("name", ["seg-r1-prerl.yaml", "seg-r1-rl.yaml", "seg-r1-sod.yaml"])
def test_reproduction_configs_hold_the_references_values_with_their_source(name):
    text = (CONFIG_DIR / name).read_text()
    tree = load_config(CONFIG_DIR / name).model_dump()
    lines = text.splitlines()
    for path, expected in _reference_values(name).items():
        node = tree
        for key in path:
            node = node[key]
        assert node == expected, f"{name}: {'.'.join(path)} is {node!r}, the reference's is {expected!r}"
        # The line that sets the value, or the comment block just above it, names the file it was read from.
        key = path[-1] if path[-1] != "max_tokens" or path[0] == "eval" else "sampling"
        at = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{key}:"))
        block = [lines[at]]
        k = at - 1
        while k >= 0 and lines[k].strip().startswith("#"):
            block.append(lines[k])
            k -= 1
        assert any(tag in "\n".join(block) for tag in ("[ref:", "[TRL")), (
            f"{name}: {key} has no source comment"
        )
    assert "[differs]" in text  # where the project deliberately departs, the file says so and why
    if name == "seg-r1-rl.yaml":  # the header lists the differences in code
        header = " ".join(line.lstrip("# ") for line in lines[:25])
        for reason in ("S-measure", "> 128", "RGB", "parser is stricter"):
            assert reason in header, reason


def test_cli_rejects_group_size_one(capsys):
    assert main(["train", "--dry-run", "grpo.group_size=1"]) == 2
    assert "group_size" in capsys.readouterr().err


def test_config_reference_is_current():
    from cluster.config_doc import config_table

    doc = (REPO / "docs" / "configuration.md").read_text()
    assert config_table() in doc, (
        "docs/configuration.md's reference is stale: paste `python -m cluster.config_doc`"
    )


def test_box_terms_need_an_answer_format_with_boxes():
    assert load_config(None, ["reward.weights.box_l1=0.5"]).reward.weights.box_l1 == 0.5
    for term in ("box_iou", "box_l1"):
        with pytest.raises(ConfigError, match="answer_format"):
            load_config(None, [f"reward.weights.{term}=0.5", "reward.answer_format=points"])


def test_top_p_below_one_is_refused_with_importance_sampling_on():
    """The engine's top-p logprobs are normalised over the nucleus, the learner's over the vocabulary: the
    importance weights would carry the nucleus mass, so the pair is refused, saying how to fix it."""
    with pytest.raises(ConfigError, match=r"top_p=0\.9 with grpo\.tis_cap=2\.0.*nucleus.*top_p=1.*tis_cap=0"):
        load_config(None, ["rollout.sampling.top_p=0.9"])
    cfg = load_config(None, ["rollout.sampling.top_p=0.9", "grpo.tis_cap=0"])
    assert cfg.rollout.sampling.top_p == 0.9 and cfg.grpo.tis_cap == 0
    assert load_config(None).grpo.tis_cap == 2.0  # on by default, with top_p 1


def test_importance_sampling_and_update_fields():
    cfg = load_config(
        None, ["grpo.is_level=sequence", "grpo.is_mode=mask", "grpo.updates_per_batch=4", "grpo.tis_cap=1.5"]
    )
    assert (cfg.grpo.is_level, cfg.grpo.is_mode, cfg.grpo.updates_per_batch) == ("sequence", "mask", 4)
    assert cfg.learner_spec().grpo.tis_cap == 1.5  # the learner gets the section as composed
    with pytest.raises(ConfigError, match=r"grpo\.tis_cap: .*below 1.*0 \(no correction\) or to 1 or more"):
        load_config(None, ["grpo.tis_cap=0.5"])
    with pytest.raises(ConfigError, match=r"grpo\.is_mode"):
        load_config(None, ["grpo.is_mode=clip"])
    with pytest.raises(ConfigError, match=r"grpo\.updates_per_batch"):
        load_config(None, ["grpo.updates_per_batch=0"])
