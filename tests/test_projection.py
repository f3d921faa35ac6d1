"""dev/projection.py: the analytic step count equals FlopCounterMode's on the benchmark's tiny shape,
and the 7B/13B projection keeps its terms visible."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_contrastive.dev import projection as P


@pytest.fixture(scope="module")
def counted(tiny_assets, tmp_path_factory):
    import os

    import torch

    from llava_contrastive.dev import bench
    from llava_contrastive.hosts.llava.compat import IGNORE_INDEX

    os.environ["LLAVA_CONTRASTIVE_TINY_DIR"] = str(tiny_assets.root)
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("projection")
    assets = bench.shape_assets("tiny", tmp / "cache", 32)
    tok, ds, collate = bench.upstream_data(assets)
    runners = bench.build_runners(["a", "c", "d"], assets, tok, text_cache_dir=tmp / "text_cache")
    batch = bench.make_batches(ds, collate, 8, 1)[0]
    flops = {n: v["flops"] for n, v in bench.counted_cost(runners, [batch]).items()}
    lc = json.loads((Path(assets.llm_dir) / "config.json").read_text())
    vc = json.loads((Path(assets.vision_dir) / "config.json").read_text())
    kv = lc["hidden_size"] * lc.get("num_key_value_heads", lc["num_attention_heads"]) // lc["num_attention_heads"]
    llm = P.Llm("tiny", lc["hidden_size"], lc["intermediate_size"], lc["num_hidden_layers"], kv, lc["vocab_size"])
    vision = P.Vision("tiny", vc["hidden_size"], vc["intermediate_size"], vc["num_hidden_layers"], vc["patch_size"],
                      vc["image_size"])
    prefix, suffix, bos = runners["d"].state["_prompt_ids"]
    caption_max = int(batch["labels"].ne(IGNORE_INDEX).sum(1).max())
    step = P.Step(batch=8, text_tokens=batch["input_ids"].shape[1] - 1,  # the <image> token becomes the patches
                  prompt_tokens=len(prefix) + len(suffix) + (bos is not None) + caption_max)
    return flops, P.step_flops(llm, vision, step, attention=False)


def test_upstream_step_equals_the_counter_exactly(counted):
    flops, terms = counted
    # every matmul of (a): tower, projector, decoder forward and input-gradient backward, lm_head
    # (the counter does not count the CPU's SDPA attention kernel, so neither does attention=False)
    assert terms["(a) total"] == flops["a"]


def test_contrastive_additions_match_the_counter(counted):
    flops, terms = counted
    assert 0 < flops["c"] - flops["a"] <= 0.001 * flops["a"]  # a few similarity / pooling products
    text_pass = flops["d"] - flops["c"]
    assert text_pass == pytest.approx(terms["(d) adds: prompted text pass (no grad)"], rel=0.05)


def test_projection_at_7b_and_13b():
    terms = P.step_flops(P.VICUNA_7B, P.CLIP_L_336, P.Step(32, 40, 48, gradient_checkpointing=True,
                                                            contrastive_batch=256))
    r = P.ratios(terms)
    assert 1.0 < r["(c)/(a)"] < 1.0001  # the similarity matrix is negligible next to a 7B pass
    assert 1.01 < r["(d)/(a)"] < 1.05  # a 48-token text pass next to a 616-token pass with recompute
    assert r["(d) cached/(a)"] == r["(c)/(a)"]
    assert P.cache_size(P.VICUNA_7B, 558_128) == pytest.approx(4.57e9, rel=0.01)
    text = P.report()
    assert "Vicuna-13B" in text and "(d)/(a)" in text and "GB" in text
