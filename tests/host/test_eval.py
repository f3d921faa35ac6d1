"""llava_contrastive.evaluation.alignment / holdout on tiny runs (the session fixtures of tests/host/conftest.py)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from llava_contrastive.evaluation import alignment as ev
from llava_contrastive.hosts.llava import eval as host_eval
from llava_contrastive.data.holdout import caption_of, normalise, split_records
from llava_contrastive.core.metrics import alignment_report

from tests.host import runs

PNG = b"\x89PNG\r\n\x1a\n"
KEYS = ("i2t@1", "i2t@5", "i2t@10", "t2i@1", "t2i@5", "t2i@10", "pos_mean", "neg_mean", "acc_i2t", "acc_t2i",
        "modality_gap", "ntp_loss", "n", "chance", "settings", "paths")


def _cli(tiny_assets, run_dir: Path, out: Path, *extra: str) -> dict:
    runs.run("llava_contrastive.eval", [
        "--model_name_or_path", str(tiny_assets.llm_dir), "--vision_tower", str(tiny_assets.vision_dir),
        "--projector", str(run_dir), "--data_path", str(tiny_assets.heldout_json),
        "--image_folder", str(tiny_assets.image_folder), "--output_dir", str(out),
        "--max_samples", "48", "--batch_size", "16", *extra], timeout=300)
    return json.loads((out / "report.json").read_text())


def _check_report(report: dict, out: Path, curves: bool) -> None:
    for k in KEYS:
        assert k in report, k
    assert report["n"] == 48 and report["chance"] == pytest.approx(1 / 48)
    for k in ("i2t@1", "i2t@5", "i2t@10", "t2i@1", "t2i@5", "t2i@10"):
        assert 0.0 <= report[k] <= 1.0
    assert report["i2t@1"] <= report["i2t@5"] <= report["i2t@10"]
    assert report["ntp_loss"] > 0 and report["modality_gap"] >= 0
    names = ["similarity_hist.png", "embedding_projection.png"] + (["training_curves.png"] if curves else [])
    for name in names:
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 2000, name


def test_eval_joint_run_cli(tiny_assets, joint_run, tmp_path):
    report = _cli(tiny_assets, joint_run, tmp_path / "joint")
    _check_report(report, tmp_path / "joint", curves=True)
    assert report["settings"]["mm_projector_type"] == "mlp2x_gelu"
    assert report["paths"]["head"] is not None  # the run's head was loaded
    assert report["settings"]["duplicates_masked"]
    prov = report["provenance"]  # what reproduces the numbers
    assert prov["seed"] == 7 and prov["training_run"]["settings"]["contrastive_weight"] == 0.5
    assert prov["versions"]["torch"] == torch.__version__ and "transformers" in prov["versions"]
    assert set(prov["git"]) == {"commit", "dirty"}
    data = Path(tiny_assets.heldout_json)
    assert prov["files"]["data_path"]["size"] == data.stat().st_size
    assert prov["files"]["data_path"]["digest"] == hashlib.sha256(data.read_bytes()).hexdigest()[:16]
    assert prov["files"]["projector"]["path"].endswith("mm_projector.bin")
    assert "config.json" in prov["model_files"]["model_name_or_path"]


def test_eval_ntp_only_projector_file(tiny_assets, weight0_run, tmp_path):
    """A bare projector file (as upstream's NTP-only recipe writes it), projector type inferred."""
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "mm_projector.bin").write_bytes((weight0_run / "mm_projector.bin").read_bytes())
    report = _cli(tiny_assets, lone / "mm_projector.bin", tmp_path / "w0")
    _check_report(report, tmp_path / "w0", curves=False)
    assert report["settings"]["mm_projector_type"] == "mlp2x_gelu"
    assert report["settings"]["embedding"]["contrastive_text_source"] == "input_embeds"
    assert report["provenance"]["seed"] is None  # a bare file: no run settings beside it


def test_baseline_report_set_beside_the_metrics(tiny_assets, weight0_run, tmp_path):
    base = tmp_path / "base" / "report.json"
    base.parent.mkdir()
    base.write_text(json.dumps({"i2t@1": 0.5, "ntp_loss": 0.25, "modality_gap": 2.0, "n": 48,
                                "provenance": {"seed": 3, "git": {"commit": "abc"}}}))
    report = _cli(tiny_assets, weight0_run, tmp_path / "w0", "--baseline", str(base.parent), "--no_figures")
    b = report["baseline"]
    assert b["path"] == str(base.resolve()) and b["seed"] == 3 and b["commit"] == "abc"
    assert set(b["metrics"]) == {"i2t@1", "ntp_loss", "modality_gap"} and b["same_data"] is None
    m = b["metrics"]["ntp_loss"]
    assert m["this"] == report["ntp_loss"] and m["delta"] == pytest.approx(report["ntp_loss"] - 0.25)
    assert m["better"] == (report["ntp_loss"] < 0.25)  # lower is better for the loss and the gap
    assert b["metrics"]["modality_gap"]["better"] and not b["metrics"]["i2t@1"]["better"]
    assert "against the baseline" in ev.format_report(report)


@pytest.mark.parametrize("content, expected", [
    (None, "no report.json there"), ("{oops", "not valid JSON"), ('{"loss": 1}', "not a held-out alignment report")])
def test_bad_baseline_is_a_usage_error_before_any_model_loads(tiny_assets, weight0_run, tmp_path, content, expected):
    base = tmp_path / "report.json"
    if content is not None:
        base.write_text(content)
    proc = runs.run("llava_contrastive.eval", [
        "--model_name_or_path", str(tmp_path / "no-llm"), "--vision_tower", str(tmp_path / "no-tower"),
        "--projector", str(weight0_run), "--data_path", "x.json", "--image_folder", "img",
        "--output_dir", str(tmp_path / "o"), "--baseline", str(base)], check=False, timeout=120)
    assert proc.returncode == 2 and expected in proc.stderr and "Traceback" not in proc.stderr


def test_metrics_equal_alignment_report(tiny_assets, joint_run):
    report = host_eval.evaluate(str(tiny_assets.llm_dir), str(tiny_assets.vision_dir), str(joint_run),
                         str(tiny_assets.heldout_json), str(tiny_assets.image_folder), max_samples=40,
                         batch_size=16, figures=False, progress=False, return_embeddings=True)
    emb = report["_embeddings"]
    assert emb.image.shape[0] == 40 and emb.keys is not None
    ref = alignment_report(emb.image, emb.text, ks=(1, 5, 10), duplicate_keys=emb.keys)
    for k, v in ref.items():
        assert report[k] == pytest.approx(v), k


def test_projector_type_inference():
    lin = {"model.mm_projector.weight": torch.zeros(4, 3), "model.mm_projector.bias": torch.zeros(4)}
    mlp = {f"model.mm_projector.{i}.{p}": torch.zeros(1) for i in (0, 2) for p in ("weight", "bias")}
    mlp3 = {f"model.mm_projector.{i}.weight": torch.zeros(1) for i in (0, 2, 4)}
    assert ev.infer_projector_type(lin) == "linear"
    assert ev.infer_projector_type(mlp) == "mlp2x_gelu"
    assert ev.infer_projector_type(mlp3) == "mlp3x_gelu"


def test_holdout_dedups(tmp_path):
    def rec(i, cap):
        return {"id": str(i), "image": f"{i}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": cap}]}

    records = [rec(i, f"caption {i % 30}") for i in range(120)]  # every caption 4 times
    records[5]["conversations"][1]["value"] = "  CAPTION 5 "  # same caption after normalisation
    train, held, counts = split_records(records, 10, seed=3)
    assert len(held) == 10 and counts["heldout"] == 10
    held_caps = {normalise(caption_of(r)) for r in held}
    assert len(held_caps) == 10
    assert not any(normalise(caption_of(r)) in held_caps for r in train)
    assert len(train) + len(held) + counts["excluded_duplicate_captions"] == len(records)
    assert split_records(records, 10, seed=3)[1] == held  # deterministic
    # the CLI writes both files
    src = tmp_path / "in.json"
    src.write_text(json.dumps(records))
    runs.run("llava_contrastive.data.holdout", ["--data_path", str(src), "--num_heldout", "10", "--seed", "3",
                                           "--out_train", str(tmp_path / "t.json"), "--out_heldout", str(tmp_path / "h.json")])
    assert json.loads((tmp_path / "h.json").read_text()) == held
    assert json.loads((tmp_path / "t.json").read_text()) == train
