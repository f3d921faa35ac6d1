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
@pytest.mark.long
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


def test_paired_differences_and_comparison_table():
    """Each row against the ntp_only row of the same seed and axes; intervals over seeds (Student t)."""
    def row(config, seed, i2t, ntp, gap=1.0):
        return {"config": config, "seed": seed, "n": 100, "chance": 0.01, "i2t@1": i2t, "t2i@1": i2t,
                "i2t@5": i2t, "modality_gap": gap, "ntp_loss": ntp, "train_final_ntp_loss": ntp, "s_per_step": 0.1}
    joint = ablate.variant_name("joint_w0.5", "qwen2", "linear", "siglip")
    base = ablate.baseline_name(joint)
    rows = [row(base, s, 0.10, 1.0) for s in range(3)]
    rows += [row(joint, 0, 0.11, 1.01, 0.9), row(joint, 1, 0.12, 1.02, 0.8), row(joint, 2, 0.16, 1.03, 0.7)]
    summary = {s["config"]: s for s in ablate.summarise(rows, [base, joint])}
    mean, lo, hi = summary[joint]["d_i2t"]  # differences 1, 2, 6 points: mean 3, half width 6.5727
    assert abs(mean - 3) < 1e-9 and abs(hi - lo - 2 * 6.5727) < 1e-3
    assert [round(v, 6) for v in summary[joint]["d_ntp"]][0] == 2.0
    lines = ablate.comparison_lines(list(summary.values()))
    (line,) = [ln for ln in lines if ln.startswith("| joint_w0.5 |")]
    assert line.startswith("| joint_w0.5 | qwen2 | siglip | linear | 3 | 0.100 -> 0.130 | +3.0 [-3.6, +9.6] |")


def test_rows_with_axes_stay_one_table_cell():
    assert ablate.cell(ablate.variant_name("joint_w0.5", "qwen2", "linear", "siglip")) == \
        "joint_w0.5, llm=qwen2, vision=siglip, projector=linear"
