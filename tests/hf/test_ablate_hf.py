"""`ablate --host hf`: the analysis axes on transformers' native LLaVA (LLM family x vision tower x
projector), each row trained through the native entry, scored by the native evaluation, and compared
with the NTP-only row of the same combination."""
from __future__ import annotations

import json

import pytest

from llava_contrastive.dev import ablate


def test_axes_are_checked_against_the_host():
    with pytest.raises(SystemExit):
        ablate.parse_args(["--output_dir", "x", "--host", "llava", "--llms", "qwen2"])
    with pytest.raises(SystemExit):
        ablate.parse_args(["--output_dir", "x", "--host", "hf", "--projectors", "mlp3x_gelu"])
    a = ablate.parse_args(["--output_dir", "x", "--host", "hf", "--llms", "qwen2", "--visions", "siglip"])
    assert a.host == "hf" and a.visions == ["siglip"]
    assert ablate.variant_name("joint_w0.5", "qwen2", "linear", "siglip") == \
        "joint_w0.5 | llm=qwen2 | vision=siglip | projector=linear"
    assert ablate.baseline_name("joint_w0.5 | llm=qwen2 | vision=siglip | projector=linear") == \
        "ntp_only | llm=qwen2 | vision=siglip | projector=linear"


@pytest.mark.slow
@pytest.mark.long
def test_native_axes_run_each_combination_against_its_own_baseline(tiny_assets, tmp_path):
    rows = ablate.run(["--host", "hf", "--output_dir", str(tmp_path), "--steps", "3", "--batch", "8", "--seeds", "0",
                       "--configs", "joint_w0.5", "--llms", "qwen2", "--visions", "siglip", "--projectors", "linear",
                       "mlp2x_gelu", "--max_samples", "16", "--jobs", "1", "--tiny_root", str(tiny_assets.root)])
    assert not [r for r in rows if "error" in r], rows
    assert sorted(r["config"] for r in rows) == sorted(
        ablate.variant_name(c, "qwen2", p, "siglip") for c in ("ntp_only", "joint_w0.5") for p in ("linear", "mlp2x_gelu"))
    for projector, act in (("linear", "linear"), ("mlp2x_gelu", "gelu")):
        run = tmp_path / "runs" / f"joint_w0.5__llm-qwen2__vision-siglip__projector-{projector}-seed0"
        config = json.loads((run / "config.json").read_text())
        assert config["projector_hidden_act"] == act and config["text_config"]["model_type"] == "qwen2"
        assert config["vision_config"]["model_type"] == "siglip_vision_model"
        report = json.loads((run / "eval" / "report.json").read_text())
        assert report["n"] == 16 and report["settings"]["mm_projector_type"] == projector
    summary = {s["config"]: s for s in json.loads((tmp_path / "ablation.json").read_text())["summary"]}
    assert "ntp_change" in summary["joint_w0.5 | llm=qwen2 | vision=siglip | projector=linear"]
    assert "vision towers: siglip" in (tmp_path / "ablation.md").read_text()
