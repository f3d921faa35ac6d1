import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """``long`` cases run only in the full set (``bash scripts/test_full.sh``); CI skips them, named."""
    if os.environ.get("LLAVA_CONTRASTIVE_FULL") == "1":
        return
    skip = pytest.mark.skip(reason="long: run by bash scripts/test_full.sh")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_assets():
    """Tiny offline assets (built once, cached by STAMP.json) -> llava_contrastive.dev.tiny.TinyAssets."""
    from llava_contrastive.dev.tiny import build_tiny_assets

    root = os.environ.get("LLAVA_CONTRASTIVE_TINY_DIR", str(REPO / "playground" / "tiny"))
    return build_tiny_assets(root)
