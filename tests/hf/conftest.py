"""Fixtures for the transformers-native host (stack M). tiny_assets comes from tests/conftest.py.

Under stack U (transformers 4.x, `pytest tests` in .venv) this directory is not collected:
run it with scripts/test_hf.sh."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _stack_m() -> bool:
    try:
        import transformers
    except ImportError:
        return False
    return int(transformers.__version__.split(".")[0]) >= 5


collect_ignore_glob = [] if _stack_m() else ["test_*.py"]


@pytest.fixture(scope="session")
def native_dir(tiny_assets, tmp_path_factory):
    """A native LlavaForConditionalGeneration checkpoint + processor built from the tiny assets."""
    from llava_contrastive.hosts.hf.convert import build_native_llava

    out = tmp_path_factory.mktemp("native-llava")
    build_native_llava(tiny_assets.llm_dir, tiny_assets.vision_dir, out)
    return out


@pytest.fixture(scope="session")
def stack_u_python():
    """The stack-U interpreter (upstream LLaVA host, transformers 4.37), for tests that compare the
    two hosts. scripts/test.sh sets LLAVA_CONTRASTIVE_STACK_U_PYTHON and LLAVA_CONTRASTIVE_REQUIRE_STACK_U=1,
    so in CI these tests fail instead of skipping when it is missing."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    py = os.environ.get("LLAVA_CONTRASTIVE_STACK_U_PYTHON") or str(repo / ".venv" / "bin" / "python")
    if not Path(py).exists():
        msg = f"stack-U python not found at {py} (run scripts/setup_env.sh, or set LLAVA_CONTRASTIVE_STACK_U_PYTHON)"
        if os.environ.get("LLAVA_CONTRASTIVE_REQUIRE_STACK_U") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return py
