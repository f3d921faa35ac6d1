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
    subprocess.run([sys.executable, "-m", "llava_contrastive.dev.bench", "--shape", "tiny", "--rounds", "1",
                    "--warmup", "0", "--steps_per_round", "1", "--json", str(out), "--markdown", str(md),
                    "--cache", str(tmp_path / "cache")], check=True, env=env, cwd=REPO, timeout=120)
    result = json.loads(out.read_text())
    timing = result["shapes"]["tiny"]["timing"]
    assert set(timing) == {"a", "b", "c", "d", "dc", "e", "f", "g"}
    for name, v in timing.items():
        for clock in ("wall", "cpu"):
            r = v[clock]["ratio"]
            assert math.isfinite(r) and r > 0, (name, clock, r)
            assert v[clock]["median_ms"] > 0
    assert timing["a"]["cpu"]["ratio"] == 1.0
    assert "| c |" in md.read_text()


def test_counted_flops_b_equals_a_and_c_within_one_percent(tiny_assets, tmp_path, monkeypatch):
    """Counted (FlopCounterMode) FLOPs of one training step, in-process on the tiny shape."""
    import torch

    from llava_contrastive.dev import bench

    monkeypatch.setenv("LLAVA_CONTRASTIVE_TINY_DIR", str(tiny_assets.root))
    torch.set_num_threads(1)
    assets = bench.shape_assets("tiny", tmp_path / "cache", 32)
    tok, ds, collate = bench.upstream_data(assets)
    runners = bench.build_runners(["a", "b", "c", "dc"], assets, tok, text_cache_dir=tmp_path / "text_cache")
    batches = bench.make_batches(ds, collate, 8, 1)
    counted = bench.counted_cost(runners, batches)
    flops = {n: v["flops"] for n, v in counted.items()}
    # (b) is --contrastive_weight 0: the model's forward returns upstream's super().forward(...) before
    # any plugin code runs, so the step executes exactly upstream's operations: equal counts, not close ones
    assert flops["b"] == flops["a"] > 0
    assert 1.0 < flops["c"] / flops["a"] <= 1.01
    # (d) with a filled text cache: no text-only LLM pass left, so it costs what (c) costs (+-1% of (a))
    assert abs(flops["dc"] - flops["c"]) <= 0.01 * flops["a"]
    assert counted["b"]["flops_met"] and counted["c"]["flops_met"] and counted["dc"]["flops_met"]
    # deterministic: the same count on a second call
    assert bench.count_step_flops(runners["c"], batches[0]) == flops["c"]
    assert bench.count_step_flops(runners["a"], batches[0]) == flops["a"]
    # CPU: no allocator statistics, reported as such (None -> "n/a" in the markdown)
    assert counted["a"]["peak_mb"] is None
    assert "n/a" in bench.counted_markdown(counted)


def test_median_interval_and_verdicts():
    from llava_contrastive.dev.bench import median_interval, verdict

    tight = [1.004 + 0.001 * (i % 5) for i in range(30)]  # 1.004 .. 1.008
    low, high = median_interval(tight)
    assert 1.004 <= low <= 1.006 <= high <= 1.008
    assert median_interval(tight) == (low, high)  # seeded: the same interval every call
    assert verdict(low, high, 1.01) == "met"
    assert verdict(1.031, 1.035, 1.03) == "missed"
    assert verdict(1.02, 1.04, 1.03) == "unresolved"  # contains the target
    assert verdict(0.95, 1.02, 1.03) == "met"  # wider than the 3% margin, but all of it below
    noisy = [0.8, 1.2] * 15
    assert verdict(*median_interval(noisy), 1.03) == "unresolved"
