"""--contrastive_text_cache on the upstream host: the same losses as the live prompted text pass (1 and
2 ranks), refusal of a cache built for other settings, a killed precompute resumes, missing captions
are computed and appended."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from llava_contrastive.core.text_cache import TextEmbeddingCache
from tests.host import runs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
STEPS = 3
LLM_TEXT = ["--contrastive_text_source", "llm", "--contrastive_prompt", "prompteol"]


@pytest.fixture(scope="module")
def tc_work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("text_cache")


@pytest.fixture(scope="module")
def sixteen(tiny_assets, tc_work) -> Path:
    records = json.loads(Path(tiny_assets.pretrain_json).read_text())[:16]
    path = tc_work / "sixteen.json"
    path.write_text(json.dumps(records))
    return path


def _precompute(tiny_assets, data: Path, cache: Path, *extra: str, check=True, log=None) -> subprocess.CompletedProcess:
    return runs.run("llava_contrastive", ["text-cache", "--model_name_or_path", str(tiny_assets.llm_dir),
                                          "--data_path", str(data), "--contrastive_text_cache", str(cache),
                                          "--model_max_length", "96", "--no_progress", *extra],
                    check=check, log=log)


def _train(tiny_assets, tc_work, data, initial_projector, name, extra=(), nproc=1, check=True, zero=None):
    out = tc_work / name
    args = runs.stage1_args(tiny_assets, out, steps=STEPS, batch=8 // nproc, extra=[
        "--data_path", str(data), "--pretrain_mm_mlp_adapter", str(initial_projector), *LLM_TEXT, *extra])
    if nproc > 1:
        args += ["--deepspeed", str(zero or runs.ZERO2)]
    proc = runs.run("llava_contrastive.train", args, nproc=nproc, check=check, log=tc_work / f"{name}.log")
    return out, proc


def _cache_rows(directory: Path) -> dict:
    ident = json.loads((directory / "identity.json").read_text())
    cache = TextEmbeddingCache(str(directory), ident, writer="reader")
    keys = cache.keys()
    found, rows = cache.lookup(keys)
    assert bool(found.all())
    return {int(k): rows[i].clone() for i, k in enumerate(keys.tolist())}


def _same_losses(a: Path, b: Path) -> None:
    la, lb = runs.train_logs(a), runs.train_logs(b)
    assert len(la) == len(lb) == STEPS
    for x, y in zip(la, lb):
        for key in ("ntp_loss", "contrastive_loss", "loss"):
            # logged to 6 decimals: two values 1e-7 apart can print one unit (1e-6) apart
            assert abs(x[key] - y[key]) <= 1e-6 + 1e-9, (key, x, y)


@pytest.fixture(scope="module")
def precomputed(tiny_assets, tc_work, sixteen) -> Path:
    cache = tc_work / "cache_pre"
    _precompute(tiny_assets, sixteen, cache, "--batch_size", "5")
    return cache


@pytest.fixture(scope="module")
def live_1(tiny_assets, tc_work, sixteen, initial_projector) -> Path:
    return _train(tiny_assets, tc_work, sixteen, initial_projector, "live1")[0]


def test_one_rank_cached_losses_equal_live(tiny_assets, tc_work, sixteen, initial_projector, precomputed, live_1):
    before = _cache_rows(precomputed)
    assert len(before) == 16
    cached, _ = _train(tiny_assets, tc_work, sixteen, initial_projector, "cached1",
                       ["--contrastive_text_cache", str(precomputed)])
    _same_losses(live_1, cached)
    after = _cache_rows(precomputed)
    assert set(after) == set(before)  # every caption was found: nothing recomputed or appended

    empty = tc_work / "cache_fly1"  # filled on the fly: each missing caption computed live and appended
    fly, _ = _train(tiny_assets, tc_work, sixteen, initial_projector, "fly1", ["--contrastive_text_cache", str(empty)])
    _same_losses(live_1, fly)
    filled = _cache_rows(empty)
    assert set(filled) == set(before)  # 3 steps x 8 rows cover the 16 captions
    for k, row in filled.items():
        assert torch.allclose(row, before[k], atol=1e-5, rtol=1e-5)  # other batch padding: fp32 rounding
    # the run's own settings: the cache location is not saved with it (it does not change results)
    assert "contrastive_text_cache" not in json.loads((fly / "config.json").read_text()).get("contrastive", {})


@pytest.mark.distributed
def test_two_ranks_cached_losses_equal_live(tiny_assets, tc_work, sixteen, initial_projector, precomputed):
    live, _ = _train(tiny_assets, tc_work, sixteen, initial_projector, "live2", nproc=2)
    empty = tc_work / "cache_fly2"
    fly, _ = _train(tiny_assets, tc_work, sixteen, initial_projector, "fly2",
                    ["--contrastive_text_cache", str(empty)], nproc=2)
    _same_losses(live, fly)
    parts = sorted(p.name for p in empty.glob("part-*.keys"))
    assert parts == ["part-r0.keys", "part-r1.keys"]  # each rank appended its own captions
    pre, _ = _train(tiny_assets, tc_work, sixteen, initial_projector, "cached2",
                    ["--contrastive_text_cache", str(precomputed)], nproc=2)
    _same_losses(live, pre)


@pytest.mark.distributed
def test_zero3_cached_losses_equal_live(tiny_assets, tc_work, sixteen, initial_projector, precomputed):
    """ZeRO-3 partitions the LLM: its identity is read by gathering each weight, so the cache built
    without DeepSpeed serves the partitioned run, with the live run's losses."""
    live, _ = _train(tiny_assets, tc_work, sixteen, initial_projector, "live_z3", nproc=2, zero=runs.ZERO3)
    before = {p.name: p.stat().st_size for p in precomputed.iterdir()}
    pre, _ = _train(tiny_assets, tc_work, sixteen, initial_projector, "cached_z3",
                    ["--contrastive_text_cache", str(precomputed)], nproc=2, zero=runs.ZERO3)
    _same_losses(live, pre)
    assert {p.name: p.stat().st_size for p in precomputed.iterdir()} == before  # all found, nothing appended


def test_cache_for_another_layer_or_prompt_is_refused(tiny_assets, tc_work, sixteen, initial_projector, precomputed):
    _, proc = _train(tiny_assets, tc_work, sixteen, initial_projector, "refused_layer",
                     ["--contrastive_text_cache", str(precomputed), "--contrastive_text_layer", "-2"], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "contrastive_text_layer: cache has -1, this run has -2" in proc.stderr and "Fix:" in proc.stderr
    proc = _precompute(tiny_assets, sixteen, precomputed, "--contrastive_prompt", "e5v", check=False)
    assert proc.returncode == 2 and "prompt_template" in proc.stderr and "--contrastive_prompt" in proc.stderr


def test_killed_precompute_resumes_to_the_uninterrupted_result(tiny_assets, tc_work):
    data = Path(tiny_assets.pretrain_json)
    n = 600
    full = tc_work / "cache_full"
    _precompute(tiny_assets, data, full, "--max_samples", str(n), "--batch_size", "4")
    ref = _cache_rows(full)
    assert len(ref) > 550

    part = tc_work / "cache_killed"
    cmd = runs.command("llava_contrastive", ["text-cache", "--model_name_or_path", str(tiny_assets.llm_dir),
                                             "--data_path", str(data), "--contrastive_text_cache", str(part),
                                             "--model_max_length", "96", "--no_progress", "--max_samples", str(n),
                                             "--batch_size", "4"])
    proc = subprocess.Popen(cmd, cwd=runs.REPO, env=runs.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    keys = part / "part-r0.keys"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if keys.exists() and keys.stat().st_size >= 8 * 40:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the build finished before it could be interrupted"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(_cache_rows(part))
    assert 0 < partial < len(ref)
    out = _precompute(tiny_assets, data, part, "--max_samples", str(n), "--batch_size", "4")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["computed_here"] == len(ref) - partial  # only the missing captions
    got = _cache_rows(part)
    assert set(got) == set(ref)
    for k, row in got.items():
        assert torch.allclose(row, ref[k], atol=1e-5, rtol=1e-5)  # other batch padding: fp32 rounding


def test_missing_caption_is_computed_and_appended(tiny_assets, tmp_path):
    """In-process: a batch whose captions are partly cached returns exactly the live embeddings."""
    import transformers

    from llava_contrastive.core.config import ContrastiveArguments
    from llava_contrastive.hosts.llava.model import ContrastiveLlavaForCausalLM

    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_assets.llm_dir), use_fast=False)
    model = ContrastiveLlavaForCausalLM.from_pretrained(str(tiny_assets.llm_dir), torch_dtype=torch.float32).eval()
    model.requires_grad_(False)
    model.init_contrastive(ContrastiveArguments(contrastive_text_source="llm", contrastive_text_cache=str(tmp_path)), tok)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 500, (6, 9), generator=g)
    mask = torch.ones(6, 9, dtype=torch.bool)
    mask[1, 5:] = mask[4, 2:] = False
    ids[5] = ids[0]  # a duplicate caption in the batch: computed once
    live = model._live_text_embeddings(ids, mask)
    model._text_embeddings(ids[:2], mask[:2])  # cache rows 0 and 1 (and 5, the same caption as 0)

    calls = []
    original = model._live_text_embeddings
    model._live_text_embeddings = lambda i, m: calls.append(i.shape[0]) or original(i, m)
    got = model._text_embeddings(ids, mask)
    assert calls == [3]  # rows 2, 3, 4 only
    assert torch.allclose(got, live, atol=1e-6, rtol=0) and bool(got.abs().sum(1).gt(0).all())
    assert len(_cache_rows(tmp_path)) == 5  # appended to disk, visible to a new reader
    calls.clear()
    assert torch.equal(model._text_embeddings(ids, mask), got) and calls == []
