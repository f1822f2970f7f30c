"""actors/vllm_plugin.py registers the project's image-only Qwen2.5-VL with vLLM on every install: where
torchvision is present (every GPU install) as well as on the CPU machines, so the engine and the learner
preprocess images on one path (docs/rollout.md)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.support.paths import REPO

pytest.importorskip("vllm")

pytestmark = pytest.mark.vllm

_CHECK = textwrap.dedent(
    """
    import sys
    from actors import vllm_plugin
    vllm_plugin.register(torchvision=sys.argv[1] == "yes")
    from vllm import ModelRegistry
    model = ModelRegistry.models[vllm_plugin.ARCHITECTURE]
    stand_in = vllm_plugin._TV_MODULE in sys.modules
    print(f"{model.module_name}:{model.class_name} stand_in={stand_in}")
    """
)


def _register(tmp_path, torchvision: bool) -> str:
    """register() as an install with / without torchvision runs it, in a fresh interpreter (no plugin has run
    there). A torchvision cannot be faked here: transformers imports it as soon as it is found."""
    code = f"import sys; sys.path.insert(0, {str(REPO)!r})\n" + _CHECK
    out = subprocess.run(
        [sys.executable, "-c", code, "yes" if torchvision else "no"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("torchvision", [True, False], ids=["with-torchvision", "without-torchvision"])
def test_the_image_only_model_is_registered_with_or_without_torchvision(tmp_path, torchvision):
    got = _register(tmp_path, torchvision)
    # the stand-in smart_resize module only where torchvision cannot provide the real one
    assert got == f"actors.vllm_vl_model:ImageOnlyQwen2_5_VL stand_in={not torchvision}"
