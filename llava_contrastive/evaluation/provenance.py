"""Where a report's numbers come from, and how they compare with a baseline report.

``provenance`` records what reproduces a report: the command, package versions, the git commit (and
whether the tree was dirty), the training run's seed and settings (its ``run_settings.json``), and
content digests of the files it read (held-out data, projector, model files). ``compare_with_baseline``
puts another report's metrics beside this one's. No torch import: a report can be read anywhere.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

from llava_contrastive.training.preflight import RUN_SETTINGS_FILE, content_digest, model_files, read_run_settings

REPO = Path(__file__).resolve().parents[2]
# held-out alignment metrics a baseline is compared on (higher is better unless listed in LOWER_IS_BETTER)
BASELINE_METRICS = ("i2t@1", "i2t@5", "i2t@10", "t2i@1", "t2i@5", "t2i@10", "modality_gap", "pos_mean", "neg_mean",
                    "ntp_loss")
LOWER_IS_BETTER = frozenset({"modality_gap", "ntp_loss", "neg_mean"})


def git_info() -> Dict[str, Any]:
    """{commit, dirty} of the checkout this package runs from (None where git or the checkout is absent)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD") or None
        return {"commit": commit, "dirty": bool(git("status", "--porcelain")) if commit else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def versions() -> Dict[str, str]:
    from llava_contrastive import __version__, host_versions

    return {"llava_contrastive": __version__, "python": sys.version.split()[0], **host_versions()}


def file_digest(path: Optional[str]) -> Optional[Dict[str, Any]]:
    """{path, size, digest} of a file (see preflight.content_digest), None when absent."""
    if not path or not Path(path).is_file():
        return None
    return {"path": str(Path(path).resolve()), "size": Path(path).stat().st_size, "digest": content_digest(path)}


def provenance(run_dir: Optional[Path], paths: Mapping[str, Any], argv: Optional[Sequence[str]] = None
               ) -> Dict[str, Any]:
    """What made a held-out report: command, versions, git, the training run's seed and settings,
    digests of the data, projector and model files read."""
    run = read_run_settings(str(run_dir)) if run_dir is not None else None
    compared = (run or {}).get("compared", {})
    models = {k: model_files(str(paths[k])) for k in ("model_name_or_path", "vision_tower", "llm_dir", "vision_dir")
              if paths.get(k)}
    return {
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": [sys.executable, *(sys.argv if argv is None else argv)],
        "versions": versions(),
        "git": git_info(),
        "seed": compared.get("seed"),
        "training_run": {"settings_file": str(Path(run_dir) / RUN_SETTINGS_FILE) if run else None,
                         "settings": {k: v for k, v in compared.items() if k != "model_files"} or None,
                         "info": (run or {}).get("info")},
        "files": {"data_path": file_digest(paths.get("data_path")), "projector": file_digest(paths.get("projector")),
                  "head": file_digest(paths.get("head"))},
        "model_files": {k: v for k, v in models.items() if v is not None},
    }


def load_report(path: str) -> Dict[str, Any]:
    """A report.json (or a directory holding one, e.g. a run's eval/), with a clear error otherwise."""
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"--baseline {path}: no report.json there. Fix: pass the report.json (or the eval "
                                f"directory) of the run to compare with.") from None
    except ValueError as err:
        raise ValueError(f"--baseline {p}: not valid JSON ({err}).") from None
    if not isinstance(data, dict) or not any(k in data for k in BASELINE_METRICS):
        raise ValueError(f"--baseline {p}: not a held-out alignment report (none of {', '.join(BASELINE_METRICS)}).")
    data["_path"] = str(p.resolve())
    return data


def compare_with_baseline(report: Mapping[str, Any], baseline: Mapping[str, Any]) -> Dict[str, Any]:
    """{path, commit, seed, same_data, metrics: {name: {this, baseline, delta, better}}} for the metrics both hold."""
    metrics = {}
    for k in BASELINE_METRICS:
        a, b = report.get(k), baseline.get(k)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            delta = float(a) - float(b)
            metrics[k] = {"this": a, "baseline": b, "delta": delta,
                          "better": delta == 0 or (delta < 0) == (k in LOWER_IS_BETTER)}
    prov, base_prov = report.get("provenance", {}), baseline.get("provenance", {})
    ours, theirs = (prov.get("files") or {}).get("data_path"), (base_prov.get("files") or {}).get("data_path")
    same_data = (ours or {}).get("digest") == (theirs or {}).get("digest") if ours and theirs else None
    return {"path": baseline.get("_path"), "commit": (base_prov.get("git") or {}).get("commit"),
            "seed": base_prov.get("seed"), "n": baseline.get("n"), "same_data": same_data, "metrics": metrics}


__all__ = ["provenance", "git_info", "versions", "file_digest", "load_report", "compare_with_baseline",
           "BASELINE_METRICS"]
