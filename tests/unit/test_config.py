"""cluster.config: loading, overrides, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster.cli import main
from cluster.config import ConfigError, TrainConfig, apply_overrides, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "cluster" / "configs").glob("*.yaml"))


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


def test_cli_dry_run_prints_resolved_config(tmp_path, capsys):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"grpo": {"group_size": 6}}))
    assert main(["train", "--config", str(cfg_file), "--dry-run", "seed=7"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["grpo"]["group_size"] == 6 and resolved["seed"] == 7


def test_cli_rejects_group_size_one(capsys):
    assert main(["train", "--dry-run", "grpo.group_size=1"]) == 2
    assert "group_size" in capsys.readouterr().err


def test_readme_config_reference_is_current():
    from cluster.config_doc import config_table

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert config_table() in readme, (
        "README's configuration reference is stale: paste `python -m cluster.config_doc`"
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
