"""The text-embedding cache through the native host (the cache itself is host-independent code in
core/text_cache.py and hosts/common.py; tests/host/test_text_cache.py runs the upstream host, 1 and
2 ranks and ZeRO-3): a run that fills the cache and a run that reads it log the live run's losses."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from hf.test_resume import logs, run, train_args

pytestmark = pytest.mark.slow
LLM_TEXT = ["--contrastive_text_source", "llm", "--contrastive_prompt", "prompteol"]


def test_cached_text_pass_gives_the_live_losses(tiny_assets, native_dir, tmp_path):
    data = tmp_path / "sixteen.json"
    data.write_text(json.dumps(json.loads(Path(tiny_assets.pretrain_json).read_text())[:16]))
    cache = tmp_path / "cache"

    def train(name, *extra):
        out = tmp_path / name
        run(train_args(tiny_assets, native_dir, out, steps=4, save=100, batch=8,
                       extra=["--data_path", str(data), *LLM_TEXT, *extra]), log=tmp_path / f"{name}.log")
        return logs(out)

    live = train("live")
    filling = train("filling", "--contrastive_text_cache", str(cache))  # 2 epochs of 16: filled in epoch 1
    assert sorted(p.name for p in cache.glob("part-*.keys")) == ["part-r0.keys"]
    reading = train("reading", "--contrastive_text_cache", str(cache))
    for other in (filling, reading):
        assert [h["step"] for h in other] == [h["step"] for h in live] == [1, 2, 3, 4]
        for a, b in zip(live, other):
            for key in ("loss", "ntp_loss", "contrastive_loss"):
                assert abs(a[key] - b[key]) <= 1e-6 + 1e-9, (key, a, b)
