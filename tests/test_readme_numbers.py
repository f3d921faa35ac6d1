"""The README's headline numbers are the default run's: rerun `bash scripts/pretrain_contrastive.sh`
(the embedded default, its own seed and settings) and compare with the README's headline block
(`llava-contrastive headline --check`: equal after rounding to the printed digits)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llava_contrastive.evaluation import headline

REPO = Path(__file__).resolve().parents[1]


def test_block_round_trips_and_mismatches_are_named(tmp_path):
    report = {"i2t@1": 0.06, "t2i@1": 0.0725, "chance": 1 / 1200, "modality_gap": 0.99084, "ntp_loss": 0.76749,
              "n": 1200, "provenance": {"seed": 42, "git": {"commit": "0123456789abcdef"},
                                        "versions": {"torch": "2.13.0"}, "training_run": {"info": {}}}}
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{headline.BEGIN}\nold\n{headline.END}\nrest\n")
    headline.write(readme, report, "eval/report.json")
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("\nrest\n") and "| modality gap | `modality_gap` | 0.9908 |" in text
    values = headline.readme_values(text)
    assert values == {"i2t@1": 0.06, "t2i@1": 0.0725, "chance": 0.00083, "modality_gap": 0.9908, "ntp_loss": 0.7675}
    assert headline.mismatches(report, values) == []
    other = dict(report, ntp_loss=0.7681)
    (bad,) = headline.mismatches(other, values)
    assert bad.startswith("ntp_loss (held-out NTP loss): README 0.7675, this run 0.7681")
    assert headline.mismatches(other, values, tolerance=1e-3) == []


@pytest.mark.slow
def test_default_run_reproduces_the_readme(tmp_path):
    out = tmp_path / "default-run"
    env = dict(os.environ, PYTHON=sys.executable, OUTPUT_DIR=str(out))
    for k in ("MODEL", "MAX_STEPS", "NUM_GPUS", "GLOBAL_BATCH", "SEED", "HOSTFILE", "NNODES", "LAUNCHER", "DRY_RUN"):
        env.pop(k, None)
    proc = subprocess.run(["bash", str(REPO / "scripts" / "pretrain_contrastive.sh")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = out / "eval" / "report.json"
    assert json.loads(report.read_text())["provenance"]["seed"] == 42
    check = subprocess.run([sys.executable, "-m", "llava_contrastive", "headline", "--check", "--report", str(report)],
                           env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


def _section_rows(heading: str) -> list:
    readme = (REPO / "README.md").read_text()
    start = readme.index(heading)
    section = readme[start:readme.index("\n## ", start + 1)]
    return [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("|---")]


def _generated_rows(folder: str) -> list:
    return [line for p in sorted((REPO / "docs" / folder).glob("*.md")) for line in p.read_text().splitlines()
            if line.startswith("| ")]


def _cells(row: str) -> list:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def test_analysis_tables_are_copied_from_the_generated_reports():
    """Every table row of the README's analysis section is a row of a report `ablate` wrote
    (docs/analysis/*.md), character for character: no number there is typed by hand."""
    rows = _section_rows("## Across LLM families, vision towers and projectors")
    assert len(rows) >= 10, rows
    generated = _generated_rows("analysis")
    missing = [row for row in rows if row not in generated]
    assert not missing, missing


def test_downstream_tables_are_copied_from_the_generated_reports():
    """Every table row of the README's downstream section is a row `reproduce` wrote
    (docs/reproduction/*.md), or, for a table gathered from several reports (one row each), its
    cells after the row label end a generated row in the same order."""
    rows = _section_rows("## Downstream: benchmarks, VQA inference, the two-stage reproduction")
    assert len(rows) >= 30, rows
    generated = _generated_rows("reproduction")
    generated_cells = [_cells(g) for g in generated]

    def ends_a_generated_row(row: str) -> bool:
        values = _cells(row)[1:]
        return any(len(g) > len(values) and g[-len(values):] == values for g in generated_cells)

    missing = [row for row in rows if row not in generated and not ends_a_generated_row(row)]
    assert not missing, missing


def test_exact_on_the_tables_cpu_model_and_a_tolerance_elsewhere(tmp_path, monkeypatch):
    """The table records the CPU model it was written on: --check is exact there, within
    CROSS_CPU_TOLERANCE on another model (other SIMD kernels sum in another order)."""
    report = {"i2t@1": 0.06, "modality_gap": 0.9908, "n": 1200, "provenance": {"seed": 42}}
    readme = tmp_path / "README.md"
    readme.write_text(f"{headline.BEGIN}\n{headline.END}\n")
    monkeypatch.setattr(headline, "cpu_model", lambda: "CPU A")
    headline.write(readme, report, "r.json")
    text = readme.read_text()
    assert headline.readme_cpu(text) == "CPU A" and headline.check_tolerance(text, None) == 0.0
    assert headline.check_tolerance(text, 0.003) == 0.003
    monkeypatch.setattr(headline, "cpu_model", lambda: "CPU B")
    assert headline.check_tolerance(text, None) == headline.CROSS_CPU_TOLERANCE
    assert headline.mismatches(dict(report, modality_gap=0.9986), headline.readme_values(text),
                               headline.check_tolerance(text, None)) == []
