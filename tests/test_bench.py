"""Smoke test of the benchmark: one round, tiny shape, one step per variant, no subprocesses."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_tiny_smoke(tiny_assets, tmp_path):
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               LLAVA_CONTRASTIVE_QUIET="1", LLAVA_CONTRASTIVE_TINY_DIR=str(tiny_assets.root))
    subprocess.run([sys.executable, "-m", "llava_contrastive.bench", "--shape", "tiny", "--rounds", "1",
                    "--warmup", "0", "--steps-per-round", "1", "--json", str(out), "--markdown", str(md),
                    "--cache", str(tmp_path / "cache")], check=True, env=env, cwd=REPO, timeout=120)
    result = json.loads(out.read_text())
    timing = result["shapes"]["tiny"]["timing"]
    assert set(timing) == set("abcdefg")
    for name, v in timing.items():
        for clock in ("wall", "cpu"):
            r = v[clock]["ratio"]
            assert math.isfinite(r) and r > 0, (name, clock, r)
            assert v[clock]["median_ms"] > 0
    assert timing["a"]["cpu"]["ratio"] == 1.0
    assert "| c |" in md.read_text()
