"""`llava-contrastive ablate` with the LLM-family and projector axes: each row is trained on its
family's tiny LLM with its projector and compared with the NTP-only row of the same combination."""
from __future__ import annotations

import json

import pytest

from llava_contrastive.dev import ablate


def test_variant_and_baseline_names():
    name = ablate.variant_name("joint_w0.5", "mistral", "linear")
    assert name == "joint_w0.5 | llm=mistral | projector=linear"
    assert ablate.baseline_name(name) == "ntp_only | llm=mistral | projector=linear"
    assert ablate.variant_name("joint_w0.5", None, None) == "joint_w0.5"
    assert ablate.baseline_name("joint_w0.5") == "ntp_only"


@pytest.mark.slow
def test_axes_run_each_combination_against_its_own_baseline(tiny_assets, tmp_path):
    rows = ablate.run(["--output_dir", str(tmp_path), "--steps", "3", "--batch", "8", "--seeds", "0",
                       "--configs", "joint_w0.5", "--llms", "llama", "mistral", "--projectors", "linear",
                       "--max_samples", "16", "--jobs", "1", "--tiny_root", str(tiny_assets.root)])
    names = sorted(r["config"] for r in rows)
    assert names == sorted(ablate.variant_name(c, llm, "linear") for c in ("ntp_only", "joint_w0.5")
                           for llm in ("llama", "mistral"))
    assert not [r for r in rows if "error" in r]
    for llm, model_type in (("llama", "llama"), ("mistral", "mistral")):
        run = tmp_path / "runs" / f"joint_w0.5__llm-{llm}__projector-linear-seed0"
        settings = json.loads((run / "run_settings.json").read_text())["compared"]
        assert settings["mm_projector_type"] == "linear"
        assert json.loads((run / "config.json").read_text())["model_type"] == f"llava_{model_type}"
    summary = json.loads((tmp_path / "ablation.json").read_text())["summary"]
    joint = {s["config"]: s for s in summary}["joint_w0.5 | llm=mistral | projector=linear"]
    assert "ntp_change" in joint  # compared with "ntp_only | llm=mistral | projector=linear"
    assert "llm=mistral" in (tmp_path / "ablation.md").read_text()
