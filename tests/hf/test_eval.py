"""python -m llava_contrastive.hosts.hf.eval: held-out retrieval evaluation on the native host.

* the metrics equal a float64 recomputation by naive loops over the same embeddings (duplicate
  captions masked by caption text), the embeddings and the held-out NTP loss equal a recomputation
  with transformers' plain LlavaForConditionalGeneration, and the CLI writes report.json + figures;
* cross-host: the same upstream-format mm_projector.bin evaluated by the upstream host (stack U,
  ``python -m llava_contrastive.evaluation.alignment`` in its own interpreter) and by the native host gives the same
  recall / gap / cosine metrics; the NTP loss differs only by the native vocabulary's extra
  ``<image>`` logit (docs/HF_HOST.md "Known differences").
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"
METRICS = ("i2t@1", "i2t@5", "i2t@10", "t2i@1", "t2i@5", "t2i@10", "acc_i2t", "acc_t2i",
           "modality_gap", "pos_mean", "neg_mean")
RECALLS = METRICS[:8]
# Cross-host tolerance on gap / cosine means. Measured on 200 held-out pairs (3 embedding settings, 2
# projectors): |native - upstream| <= 1.2e-7 for the gap (float32 normalise + mean over different
# kernels of transformers 4.37 vs 5.23), <= 1e-9 for pos/neg (accumulated in float64). 1e-5 leaves
# 100x margin and is still 500x below one recall flip at n = 200 (5e-3). Recalls must be identical.
CROSS_HOST_ATOL = 1e-5
N_CROSS = 200


def _env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", LLAVA_CONTRASTIVE_QUIET="1",
                TOKENIZERS_PARALLELISM="false", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")


def _run(python: str, module: str, args: list, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([python, "-m", module, *map(str, args)], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{module} exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def trained_run(tiny_assets, tmp_path_factory) -> Path:
    """30 steps of native stage-1 training (default contrastive settings): metrics above chance."""
    from llava_contrastive.hosts.hf import train

    out = tmp_path_factory.mktemp("hf-eval") / "run"
    train.run(["--llm_dir", str(tiny_assets.llm_dir), "--vision_dir", str(tiny_assets.vision_dir),
                "--data_path", str(tiny_assets.pretrain_json), "--image_folder", str(tiny_assets.image_folder),
                "--output_dir", str(out), "--per_device_train_batch_size", "16", "--learning_rate", "5e-3",
                "--lr_scheduler_type", "constant", "--max_steps", "30", "--logging_steps", "1",
                "--report_to", "none", "--save_strategy", "no", "--dataloader_num_workers", "0",
                "--disable_tqdm", "true", "--seed", "0", "--contrastive_weight", "0.5"])
    assert (out / "mm_projector.bin").is_file()
    return out


def _caption(record) -> str:
    return record["conversations"][1]["value"]


@pytest.fixture(scope="module")
def heldout_with_duplicates(tiny_assets, tmp_path_factory) -> Path:
    """60 held-out records in which 10 pairs share a caption (different images): the held-out split
    itself has none (holdout.py deduplicates), so the masking is exercised here."""
    records = json.loads(Path(tiny_assets.heldout_json).read_text())[:60]
    for k in range(10):
        records[2 * k + 1]["conversations"][1]["value"] = _caption(records[2 * k])
    path = tmp_path_factory.mktemp("hf-eval-data") / "heldout_dups.json"
    path.write_text(json.dumps(records))
    return path


# ---- independent recomputations ------------------------------------------------------------------
def naive_metrics(image: torch.Tensor, text: torch.Tensor, captions: list) -> dict:
    """float64 python loops: cosine matrix, recall@k (strictly-better candidates counted, candidates
    with the query's caption skipped), argmax accuracy, mean positive / off-diagonal cosine, gap."""
    img = [[float(x) for x in row] for row in image.double()]
    txt = [[float(x) for x in row] for row in text.double()]

    def unit(v):
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    img, txt = [unit(v) for v in img], [unit(v) for v in txt]
    n, d = len(img), len(img[0])
    sim = [[sum(a * b for a, b in zip(img[i], txt[j])) for j in range(n)] for i in range(n)]  # [image][text]
    out = {}
    for name, s in (("i2t", lambda q, c: sim[q][c]), ("t2i", lambda q, c: sim[c][q])):
        ranks = [sum(1 for c in range(n) if captions[c] != captions[q] and s(q, c) > s(q, q)) for q in range(n)]
        for k in (1, 5, 10):
            out[f"{name}@{k}"] = sum(r < k for r in ranks) / n
        out[f"acc_{name}"] = sum(max(range(n), key=lambda c: (s(q, c), -c)) == q for q in range(n)) / n
    out["pos_mean"] = sum(sim[i][i] for i in range(n)) / n
    out["neg_mean"] = sum(sim[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    mi = [sum(v[t] for v in img) / n for t in range(d)]
    mt = [sum(v[t] for v in txt) / n for t in range(d)]
    out["modality_gap"] = math.sqrt(sum((a - b) ** 2 for a, b in zip(mi, mt)))
    return out


def plain_llava(tiny_assets, projector: Path):
    """transformers' own LlavaForConditionalGeneration (not the contrastive subclass) + the projector."""
    from llava_contrastive.hosts.hf import convert

    model, processor = convert.build_native_llava(tiny_assets.llm_dir, tiny_assets.vision_dir, None,
                                                  projector=str(projector))
    return model.eval(), processor


def plain_recompute(model, processor, records, image_folder: Path):
    """Row by row, no padding: image = mean of the projected image tokens, text = mean of the input
    embeddings of the caption's tokens, NTP = token-weighted float64 CE over caption + "\\n", and the
    same NTP with the ``<image>`` logit removed from the softmax (upstream's vocabulary)."""
    from PIL import Image

    tok = processor.tokenizer
    image_id = model.config.image_token_id
    images, texts, nll, nll_without, count = [], [], 0.0, 0.0, 0
    with torch.no_grad():
        for r in records:
            caption_ids = tok(_caption(r), add_special_tokens=False).input_ids
            target = tok(_caption(r) + "\n", add_special_tokens=False).input_ids
            assert target[:len(caption_ids)] == caption_ids
            prefix = [tok.bos_token_id] + [image_id] * model.config.image_seq_length
            ids = torch.tensor([prefix + target])
            pixels = processor.image_processor(Image.open(image_folder / r["image"]).convert("RGB"),
                                               return_tensors="pt")["pixel_values"]
            out = model(input_ids=ids, pixel_values=pixels, use_cache=False)
            images.append(out.image_hidden_states.reshape(-1, out.image_hidden_states.shape[-1]).mean(0))
            texts.append(model.get_input_embeddings()(torch.tensor(caption_ids)).mean(0))
            logits = out.logits[0, len(prefix) - 1:-1].double()
            nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(target), reduction="sum"))
            keep = torch.arange(logits.shape[1]) != image_id
            assert image_id not in target
            nll_without += float(torch.nn.functional.cross_entropy(
                logits[:, keep], torch.tensor([t - int(t > image_id) for t in target]), reduction="sum"))
            count += len(target)
    return torch.stack(images), torch.stack(texts), nll / count, nll_without / count


# ---- 1. native metrics = independent recomputation; the CLI ---------------------------------------
def test_metrics_equal_naive_recomputation(tiny_assets, trained_run, heldout_with_duplicates):
    from llava_contrastive.hosts.hf import eval as hf_eval

    report = hf_eval.evaluate(str(heldout_with_duplicates), str(tiny_assets.image_folder),
                              llm_dir=str(tiny_assets.llm_dir), vision_dir=str(tiny_assets.vision_dir),
                              projector=str(trained_run / "mm_projector.bin"), batch_size=16, figures=False,
                              progress=False, return_embeddings=True)
    emb = report["_embeddings"]
    records = json.loads(heldout_with_duplicates.read_text())
    captions = [" ".join(_caption(r).split()) for r in records]
    n = len(records)
    assert emb.image.shape == emb.text.shape and emb.image.shape[0] == n == report["n"] == report["records"]
    # the masking keys are exactly "same caption"
    keys = emb.keys.tolist()
    assert all((keys[i] == keys[j]) == (captions[i] == captions[j]) for i in range(n) for j in range(n))
    ref = naive_metrics(emb.image, emb.text, captions)
    for k, v in ref.items():
        assert report[k] == pytest.approx(v, abs=1e-9 if "@" in k or "acc" in k else 1e-6), k
    assert report["chance"] == pytest.approx(1 / n)

    # the embeddings and the NTP loss, recomputed row by row with transformers' plain LLaVA
    model, processor = plain_llava(tiny_assets, trained_run / "mm_projector.bin")
    image, text, ntp, _ = plain_recompute(model, processor, records, Path(tiny_assets.image_folder))
    torch.testing.assert_close(emb.image, image.float(), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(emb.text, text.float(), atol=1e-6, rtol=1e-5)
    assert report["ntp_tokens"] == sum(len(processor.tokenizer(_caption(r) + "\n", add_special_tokens=False)
                                           .input_ids) for r in records)
    assert report["ntp_loss"] == pytest.approx(ntp, abs=2e-6)


def test_cli_native_checkpoint_writes_report_and_figures(tiny_assets, trained_run, tmp_path):
    """The training output directory as --model_name_or_path: its own projector, settings and head."""
    out = tmp_path / "eval"
    proc = _run(sys.executable, "llava_contrastive.hosts.hf.eval", [
        "--model_name_or_path", trained_run, "--data_path", tiny_assets.heldout_json,
        "--image_folder", tiny_assets.image_folder, "--output_dir", out, "--max_samples", 48,
        "--batch_size", 16, "--no_progress"])
    report = json.loads((out / "report.json").read_text())
    from llava_contrastive.evaluation import alignment as ev

    for k in ev.REPORT_KEYS + ("settings", "paths", "records", "ntp_tokens", "eval_seconds",
                               "train_final_ntp_loss", "s_per_step"):
        assert k in report, k
    assert report["n"] == 48 and report["chance"] == pytest.approx(1 / 48)
    assert report["i2t@1"] <= report["i2t@5"] <= report["i2t@10"] <= 1
    assert report["ntp_loss"] > 0 and report["modality_gap"] > 0
    assert report["settings"]["host"] == "hf" and report["settings"]["duplicates_masked"]
    assert report["settings"]["run_contrastive_weight"] == 0.5
    saved = json.loads((trained_run / ev.HEAD_CONFIG_FILE).read_text())
    assert all(report["settings"]["embedding"][k] == saved[k] for k in ev.EMBEDDING_FLAGS)
    assert report["paths"]["head"] == str(trained_run / ev.HEAD_FILE)
    for name in ("similarity_hist.png", "embedding_projection.png", "training_curves.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 2000, name
    assert "held-out alignment report" in proc.stdout and "modality gap" in proc.stdout
    assert f"report: {out / 'report.json'}" in proc.stdout


def test_projector_and_head_resolution(tiny_assets, trained_run, tmp_path):
    """A native projector file and a run directory load the same weights as mm_projector.bin; a
    linear head that the run does not have is refused."""
    from llava_contrastive.hosts.hf import convert
    from llava_contrastive.hosts.hf import eval as hf_eval

    native = tmp_path / "projector.safetensors"
    convert.save_state(convert.upstream_to_native(convert.load_state(trained_run / "mm_projector.bin")), native)
    common = dict(llm_dir=str(tiny_assets.llm_dir), vision_dir=str(tiny_assets.vision_dir), max_samples=24,
                  batch_size=24, figures=False, progress=False, return_embeddings=True)
    a = hf_eval.evaluate(str(tiny_assets.heldout_json), str(tiny_assets.image_folder), projector=str(native), **common)
    b = hf_eval.evaluate(str(tiny_assets.heldout_json), str(tiny_assets.image_folder), projector=str(trained_run),
                         **common)
    assert torch.equal(a["_embeddings"].image, b["_embeddings"].image)
    assert a["paths"]["head"] is None and b["paths"]["head"] == str(trained_run / "contrastive_head.safetensors")
    with pytest.raises(FileNotFoundError, match="needs the trained head"):
        hf_eval.evaluate(str(tiny_assets.heldout_json), str(tiny_assets.image_folder), projector=str(native),
                         contrastive={"contrastive_head": "linear"}, **common)


def test_import_without_upstream_llava():
    """Both eval modules import without the upstream ``llava`` package (absent from stack M)."""
    code = ("import importlib.util, sys; assert importlib.util.find_spec('llava') is None; "
            "import llava_contrastive.evaluation.alignment, llava_contrastive.hosts.hf.eval; "
            "assert not any(m == 'llava' or m.startswith('llava.') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), check=True, timeout=120)


# ---- 2. cross-host agreement -----------------------------------------------------------------------
@pytest.mark.parametrize("flags", [[], ["--contrastive_text_source", "llm", "--contrastive_image_source", "llm"]],
                         ids=["default", "llm_pass"])
def test_cross_host_same_projector_same_metrics(tiny_assets, trained_run, stack_u_python, tmp_path, flags):
    """Same mm_projector.bin and run settings, 200 held-out pairs, float32 on both sides (stack U's
    eval loads the CLIP tower in float32; its fp16 default is a training flag, --vision_tower_dtype)."""
    from llava_contrastive.hosts.hf import eval as hf_eval

    common = ["--data_path", tiny_assets.heldout_json, "--image_folder", tiny_assets.image_folder,
              "--max_samples", N_CROSS, "--batch_size", 50, "--no_progress", "--no_figures", *flags]
    _run(stack_u_python, "llava_contrastive.eval", [
        "--model_name_or_path", tiny_assets.llm_dir, "--vision_tower", tiny_assets.vision_dir,
        "--projector", trained_run, "--output_dir", tmp_path / "u", *common])
    up = json.loads((tmp_path / "u" / "report.json").read_text())
    overrides = dict(zip(flags[::2], flags[1::2]))
    native = hf_eval.evaluate(str(tiny_assets.heldout_json), str(tiny_assets.image_folder),
                              llm_dir=str(tiny_assets.llm_dir), vision_dir=str(tiny_assets.vision_dir),
                              projector=str(trained_run), output_dir=str(tmp_path / "m"), max_samples=N_CROSS,
                              batch_size=50, figures=False, progress=False,
                              contrastive={k[2:]: v for k, v in overrides.items()})
    # same report layout (the native one adds settings.host and settings.vocab_size)
    assert set(native) == set(up)
    assert set(native["paths"]) == set(up["paths"])
    assert set(native["settings"]) - {"host", "vocab_size"} == set(up["settings"])
    assert native["settings"]["embedding"] == up["settings"]["embedding"]
    assert native["paths"]["head"] == up["paths"]["head"] == str(trained_run / "contrastive_head.safetensors")
    assert native["n"] == up["n"] == N_CROSS and native["ntp_tokens"] == up["ntp_tokens"]
    diffs = {k: native[k] - up[k] for k in METRICS}
    print(f"\ncross-host [{' '.join(flags) or 'default'}]: " + ", ".join(f"{k} {v:+.2e}" for k, v in diffs.items())
          + f"; ntp native {native['ntp_loss']:.7f} upstream {up['ntp_loss']:.7f}")
    for k in RECALLS:
        assert native[k] == pytest.approx(up[k], abs=1e-9), (k, diffs)
    for k in ("modality_gap", "pos_mean", "neg_mean"):
        assert abs(diffs[k]) <= CROSS_HOST_ATOL, (k, diffs)
    if not flags:  # the default (projector) space of a trained projector is above chance
        assert up["i2t@10"] >= 2 * 10 / N_CROSS and up["t2i@10"] >= 2 * 10 / N_CROSS, up
    # NTP: the native softmax has one more logit (<image>, never a target), so its loss is higher by
    # the probability mass of that logit (measured +4.8e-6 to +6.0e-6, relative ~7e-6, on this data) ...
    gap = native["ntp_loss"] - up["ntp_loss"]
    assert 0 < gap < 1e-4 * up["ntp_loss"], gap
    if not flags:
        # ... and that logit is the whole difference: without it, the native logits give upstream's loss
        records = json.loads(Path(tiny_assets.heldout_json).read_text())[:N_CROSS]
        model, processor = plain_llava(tiny_assets, trained_run / "mm_projector.bin")
        _, _, with_logit, without = plain_recompute(model, processor, records, Path(tiny_assets.image_folder))
        print(f"NTP on {N_CROSS} pairs: upstream {up['ntp_loss']:.8f}, native {native['ntp_loss']:.8f} "
              f"(recomputed {with_logit:.8f}), native without the <image> logit {without:.8f} "
              f"({without - up['ntp_loss']:+.2e})")
        assert with_logit == pytest.approx(native["ntp_loss"], abs=2e-6)
        assert without == pytest.approx(up["ntp_loss"], abs=5e-7)
