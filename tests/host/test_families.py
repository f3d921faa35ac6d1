"""LLM families of the upstream host: Mistral end to end (stage 1 -> stage 2 -> upstream's own loader,
held-out eval), MPT and other families refused before the model loads with the fix named."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from llava_contrastive.training import preflight as pf
from tests.host import runs
from tests.host.test_model import upstream  # noqa: F401 (fixture: upstream tokenizer and plain template)
from tests.host.test_upstream_loader import first_image, upstream_load


@pytest.fixture(scope="module")
def mistral_assets(tiny_assets):
    from llava_contrastive.dev.tiny import build_family_llm

    return dataclasses.replace(tiny_assets, llm_dir=build_family_llm(tiny_assets, "mistral"))


@pytest.fixture(scope="module")
def mistral_stage1(mistral_assets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("families") / "llava-mistral-tiny-pretrain"
    runs.run("llava_contrastive.train", runs.stage1_args(mistral_assets, out, steps=8), log=out.parent / "s1.log")
    return out


def test_tiny_mistral_llm_is_a_pretrained_mistral(mistral_assets, tiny_assets):
    config = json.loads((mistral_assets.llm_dir / "config.json").read_text())
    assert config["model_type"] == "mistral" and config["architectures"] == ["MistralForCausalLM"]
    assert config["num_key_value_heads"] * 2 == config["num_attention_heads"]  # grouped-query attention
    stamp = json.loads((mistral_assets.llm_dir / "STAMP.json").read_text())
    assert stamp["metrics"]["lm_heldout_loss"] < 1.0  # learnt the caption language (fresh init: ~6.2)
    for name in ("tokenizer.model", "tokenizer_config.json"):  # the default assets' tokenizer
        assert (mistral_assets.llm_dir / name).read_bytes() == (tiny_assets.llm_dir / name).read_bytes()


def test_mistral_stage1_trains_both_terms_and_saves_upstream_types(mistral_stage1):
    config = json.loads((mistral_stage1 / "config.json").read_text())
    assert config["model_type"] == "llava_mistral" and config["architectures"] == ["LlavaMistralForCausalLM"]
    logs = runs.train_logs(mistral_stage1)
    assert len(logs) == 8 and all(h["contrastive_loss"] > 0 and h["ntp_loss"] > 0 for h in logs)
    assert (mistral_stage1 / "mm_projector.bin").is_file() and (mistral_stage1 / "contrastive_head.safetensors").is_file()


def test_mistral_stage2_loads_with_upstreams_loader(mistral_assets, mistral_stage1):
    """Upstream's load_pretrained_model takes a Mistral model by its name ("mistral" in the path)."""
    out = mistral_stage1.parent / "llava-mistral-tiny-full"
    runs.run("llava_contrastive.train", runs.stage2_args(mistral_assets, out, mistral_stage1 / "mm_projector.bin",
                                                          lora=False), log=out.parent / "s2.log")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava_mistral" and config["architectures"] == ["LlavaMistralForCausalLM"]
    result = upstream_load(out, None, first_image(mistral_assets), "vicuna_v1")
    assert result["class"] == "LlavaMistralForCausalLM" and 1 <= result["new_tokens"] <= 7


def test_eval_picks_the_mistral_class(mistral_assets, mistral_stage1, tmp_path):
    from llava_contrastive.hosts.llava import eval as host_eval

    report = host_eval.evaluate(str(mistral_assets.llm_dir), str(mistral_assets.vision_dir), str(mistral_stage1),
                                str(mistral_assets.heldout_json), str(mistral_assets.image_folder), max_samples=32,
                                batch_size=16, figures=False, progress=False)
    assert report["n"] == 32 and report["ntp_loss"] > 0 and 0 <= report["i2t@1"] <= 1


def test_family_dispatch(tmp_path, tiny_assets, mistral_assets):
    from llava_contrastive.hosts.llava import model as M

    assert M.contrastive_class_for(str(tiny_assets.llm_dir)) is M.ContrastiveLlavaForCausalLM
    assert M.contrastive_class_for(str(mistral_assets.llm_dir)) is M.ContrastiveLlavaMistralForCausalLM
    for model_type, expected in (("mpt", "MPT path (LlavaMptForCausalLM) cannot run"), ("qwen2", "--host hf")):
        d = tmp_path / model_type
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": model_type}))
        with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            M.contrastive_class_for(str(d))


@pytest.mark.parametrize("name, model_type, expected", [
    ("mpt-7b", "llama", "the path contains 'mpt'"),  # upstream keys on the name
    ("some-llm", "mpt", "MPT path (LlavaMptForCausalLM) cannot run"),
    ("qwen", "qwen2", "model_type 'qwen2' is not a family upstream LLaVA ships (llama, mistral)"),
])
def test_unsupported_family_refused_before_the_model_loads(tiny_assets, tmp_path, name, model_type, expected):
    llm = tmp_path / name
    llm.mkdir()
    (llm / "config.json").write_text(json.dumps({"model_type": model_type}))
    args = runs.stage1_args(dataclasses.replace(tiny_assets, llm_dir=llm), tmp_path / "out", steps=2)
    proc = runs.run("llava_contrastive.train", args, check=False, timeout=120)
    assert proc.returncode == 2 and expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert pf.READY_MARKER not in proc.stderr


@pytest.mark.parametrize("projector, shapes", [
    ("linear", {"weight": (64, 64), "bias": (64,)}),  # a bare nn.Linear, as upstream builds it
    ("mlp3x_gelu", {f"{i}.{p}": ((64, 64) if p == "weight" else (64,)) for i in (0, 2, 4) for p in ("weight", "bias")}),
])
def test_projector_types_end_to_end(tiny_assets, tmp_path, projector, shapes):
    """Stage 1 with another projector type -> stage 2 starts from it -> upstream's loader takes the result."""
    import torch

    s1 = tmp_path / f"llava-tiny-{projector}-pretrain"
    runs.run("llava_contrastive.train", runs.stage1_args(tiny_assets, s1, steps=4, extra=[
        "--mm_projector_type", projector]), log=tmp_path / "s1.log")
    state = torch.load(s1 / "mm_projector.bin", weights_only=True)
    prefix = "model.mm_projector."
    hidden = json.loads((tiny_assets.llm_dir / "config.json").read_text())["hidden_size"]
    mm_hidden = json.loads((tiny_assets.vision_dir / "config.json").read_text())["hidden_size"]
    assert (hidden, mm_hidden) == (64, 64)  # the shapes above are the tiny tier's
    assert {k[len(prefix):]: tuple(v.shape) for k, v in state.items()} == shapes
    s2 = tmp_path / f"llava-tiny-{projector}-full"
    args = runs.stage2_args(tiny_assets, s2, s1 / "mm_projector.bin", lora=False, steps=2)
    runs.run("llava_contrastive.train", args[:args.index("--mm_projector_type") + 1] + [projector]
             + args[args.index("--mm_projector_type") + 2:], log=tmp_path / "s2.log")
    assert json.loads((s2 / "config.json").read_text())["mm_projector_type"] == projector
    result = upstream_load(s2, None, first_image(tiny_assets), "vicuna_v1")
    assert result["class"] == "LlavaLlamaForCausalLM" and 1 <= result["new_tokens"] <= 7


def test_stage2_refuses_a_projector_of_another_type(tiny_assets, tmp_path):
    """--pretrain_mm_mlp_adapter of one type with --mm_projector_type of another: named before the model loads."""
    s1 = tmp_path / "s1"
    runs.run("llava_contrastive.train", runs.stage1_args(tiny_assets, s1, steps=2, extra=["--mm_projector_type",
                                                                                         "linear"]))
    proc = runs.run("llava_contrastive.train", runs.stage2_args(tiny_assets, tmp_path / "s2", s1 / "mm_projector.bin",
                                                                lora=False, steps=2), check=False, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "mlp2x_gelu" in proc.stderr and "mm_projector.bin" in proc.stderr


def test_mistral_joint_term_is_the_core_loss_and_weight_zero_is_upstreams_mistral(mistral_assets, upstream):
    """In process, upstream's LlavaMistralForCausalLM against the plugin's Mistral class: the joint
    term is the core InfoNCE on the pair embeddings; at weight 0, three SGD steps on the same batch
    give the same loss and the same projector, step for step."""
    import torch
    from llava.model.language_model.llava_mistral import LlavaMistralForCausalLM

    from llava_contrastive.core.losses import info_nce_loss
    from llava_contrastive.hosts.llava.model import ContrastiveLlavaMistralForCausalLM
    from tests.host.test_model import build, make_batch, upstream_twin

    records = json.loads(mistral_assets.pretrain_json.read_text())[:6]
    batch = make_batch(mistral_assets, upstream, records)
    joint = build(mistral_assets, upstream, model_class=ContrastiveLlavaMistralForCausalLM)
    out = joint(**batch)
    image, text, keys, _, _ = joint.embed_pairs(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                                batch["images"])
    expected = info_nce_loss(image, text, joint.contrastive_head.logit_scale(), duplicate_keys=keys)
    assert out.contrastive_loss.item() == pytest.approx(expected.item(), abs=1e-6)

    ours = build(mistral_assets, upstream, model_class=ContrastiveLlavaMistralForCausalLM, contrastive_weight=0.0)
    theirs = upstream_twin(LlavaMistralForCausalLM, mistral_assets, ours)
    theirs.requires_grad_(False)
    theirs.get_model().mm_projector.requires_grad_(True)
    theirs.train()
    opts = [torch.optim.SGD(m.get_model().mm_projector.parameters(), lr=0.1) for m in (ours, theirs)]
    for _ in range(3):
        losses = []
        for model, opt in zip((ours, theirs), opts):
            opt.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[0] == losses[1]
    for a, b in zip(ours.get_model().mm_projector.parameters(), theirs.get_model().mm_projector.parameters()):
        assert torch.equal(a, b)


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_mistral_two_ranks_zero2_match_one_process(mistral_assets, tmp_path):
    """The Mistral class under DeepSpeed ZeRO-2 on 2 ranks (torchrun, gloo, CPU) against 1 process with
    the same global batch of 8: the same NTP and contrastive losses each step, negatives gathered from
    both ranks, and the same projector. The 8 captions have the same token count, so the average of the
    ranks' NTP means (upstream's trainer) is the one-process mean."""
    import collections

    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(mistral_assets.llm_dir), use_fast=False)
    by_length = collections.defaultdict(list)
    for record in json.loads(mistral_assets.pretrain_json.read_text()):
        by_length[len(tok(record["conversations"][1]["value"]).input_ids)].append(record)
    eight = next(group[:8] for group in by_length.values() if len(group) >= 8)
    data = tmp_path / "eight.json"
    data.write_text(json.dumps(eight))
    outs = {}
    for nproc in (1, 2):
        out = outs[nproc] = tmp_path / f"ranks{nproc}"
        args = runs.stage1_args(mistral_assets, out, steps=4, batch=8 // nproc,
                                extra=["--data_path", str(data), "--deepspeed", str(runs.ZERO2)])
        runs.run("llava_contrastive.train", args, nproc=nproc, force_launcher=True, log=tmp_path / f"ranks{nproc}.log")
    ref, logs = runs.train_logs(outs[1]), runs.train_logs(outs[2])
    assert len(ref) == len(logs) == 4
    for a, b in zip(logs, ref):
        assert a["negatives"] == b["negatives"] == 7
        for key in ("ntp_loss", "contrastive_loss"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (key, a, b)
    assert json.loads((outs[2] / "config.json").read_text())["model_type"] == "llava_mistral"
    one, two = (torch.load(o / "mm_projector.bin", weights_only=True) for o in (outs[1], outs[2]))
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=0, atol=1e-5)
