"""The README's headline numbers of the default run, written from and checked against its report.json.

``llava-contrastive headline --write`` puts the table of the default run's held-out numbers between
the README's headline markers; ``--check`` compares the README with a report (a test reruns the
default run and checks). Values are printed to fixed digits; they agree when equal after rounding
to those digits (the default run is bitwise reproducible on one machine type with its pinned
threads), or within ``--tolerance`` for runs elsewhere (other CPUs and thread counts sum in another
order).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[2]
DEFAULT_REPORT = "checkpoints/tiny-pretrain-contrastive/eval/report.json"
BEGIN = "<!-- headline:begin (written by `llava-contrastive headline --write`; do not edit) -->"
END = "<!-- headline:end -->"
# (report key, row label, digits)
ROWS: Tuple[Tuple[str, str, int], ...] = (
    ("i2t@1", "held-out image->text recall@1", 4),
    ("t2i@1", "held-out text->image recall@1", 4),
    ("chance", "chance (1/n)", 5),
    ("modality_gap", "modality gap", 4),
    ("ntp_loss", "held-out NTP loss", 4),
    ("train_final_ntp_loss", "final train NTP loss (last 10 steps)", 4),
)
_ROW_RE = re.compile(r"^\| (?P<label>[^|]+?) \| `(?P<key>[^`]+)` \| (?P<value>-?[0-9.]+) \|$")


CROSS_CPU_TOLERANCE = 0.01  # another CPU model sums in another order: seen up to 0.008 (modality gap)


def cpu_model() -> str:
    """This machine's CPU model name (/proc/cpuinfo), else platform.processor()."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def readme_cpu(text: str) -> Optional[str]:
    """The CPU model the README's headline block was written on (None for older blocks)."""
    for line in _block(text).splitlines() if BEGIN in text and END in text else []:
        if line.startswith("CPU: "):
            return line[len("CPU: "):].rstrip(".")
    return None


def check_tolerance(readme_text: str, given: Optional[float]) -> float:
    """``given``, else 0 on the CPU model the table was written on and CROSS_CPU_TOLERANCE elsewhere."""
    if given is not None:
        return given
    return 0.0 if readme_cpu(readme_text) == cpu_model() else CROSS_CPU_TOLERANCE


def block(report: Mapping[str, Any], report_path: str) -> str:
    """The markdown between the markers: one row per headline number, then where it comes from."""
    prov = report.get("provenance") or {}
    versions = prov.get("versions") or {}
    git = prov.get("git") or {}
    commit = (git.get("commit") or "unknown")[:10] + (" with uncommitted changes" if git.get("dirty") else "")
    n = report.get("n")
    threads = ((prov.get("training_run") or {}).get("info") or {}).get("omp_num_threads")
    lines = [BEGIN, "", "| held-out number | report key | value |", "|---|---|---|"]
    for key, label, digits in ROWS:
        if isinstance(report.get(key), (int, float)):
            lines.append(f"| {label} | `{key}` | {report[key]:.{digits}f} |")
    lines += ["", f"From `{report_path}` (n = {int(n) if isinstance(n, (int, float)) else n} held-out pairs; training seed {prov.get('seed')}, "
                  f"OMP threads {threads}, torch {versions.get('torch')}, transformers {versions.get('transformers')}, "
                  f"commit {commit}).", f"CPU: {cpu_model()}.", "", END]
    return "\n".join(lines)


def _block(text: str) -> str:
    return text[text.index(BEGIN):text.index(END)]


def readme_values(text: str) -> Dict[str, float]:
    """{report key: value} of the README's headline block (ValueError when the markers are missing)."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"no headline block (the line {BEGIN!r} ... {END!r})")
    inner = _block(text)
    return {m["key"]: float(m["value"]) for line in inner.splitlines() if (m := _ROW_RE.match(line.strip()))}


def mismatches(report: Mapping[str, Any], readme: Mapping[str, float], tolerance: float = 0.0) -> List[str]:
    """Headline numbers of the README that the report does not reproduce: equal after rounding to the
    printed digits, or within ``tolerance`` (absolute) when given."""
    out = []
    for key, label, digits in ROWS:
        if key not in readme:
            continue
        value = report.get(key)
        if not isinstance(value, (int, float)):
            out.append(f"{key}: in the README ({readme[key]}) but not in the report")
        elif round(value, digits) != readme[key] and abs(value - readme[key]) > tolerance:
            out.append(f"{key} ({label}): README {readme[key]:.{digits}f}, this run {value:.{digits}f} "
                       f"(difference {value - readme[key]:+.{digits + 1}f}, tolerance {tolerance:g})")
    return out


def write(readme_path: Path, report: Mapping[str, Any], report_path: str) -> None:
    text = readme_path.read_text()
    new = block(report, report_path)
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + new + text[text.index(END) + len(END):]
    else:
        raise ValueError(f"{readme_path}: no headline markers; add the two lines {BEGIN!r} and {END!r} where the "
                         f"table goes")
    readme_path.write_text(text)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="llava-contrastive headline", description=__doc__.split("\n\n")[0])
    p.add_argument("--report", default=DEFAULT_REPORT, help=f"report.json of the default run (default {DEFAULT_REPORT})")
    p.add_argument("--readme", default=str(REPO / "README.md"))
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="write the report's numbers into the README")
    mode.add_argument("--check", action="store_true", help="exit 1 when the README's numbers differ from the report's")
    p.add_argument("--tolerance", type=float, default=None,
                   help="absolute tolerance of --check (default: equal after rounding to the printed digits on "
                        f"the CPU model the table was written on, {CROSS_CPU_TOLERANCE} on another)")
    a = p.parse_args(argv)
    try:
        report = json.loads(Path(a.report).read_text())
    except (OSError, ValueError) as err:
        print(f"headline: cannot read --report {a.report}: {err}. Fix: run `bash scripts/pretrain_contrastive.sh` "
              f"first (it writes {DEFAULT_REPORT}).", file=sys.stderr)
        return 2
    readme = Path(a.readme)
    try:
        if a.write:
            write(readme, report, a.report)
            print(f"headline: {readme} updated from {a.report}")
            return 0
        text = readme.read_text()
        tolerance = check_tolerance(text, a.tolerance)
        if tolerance and a.tolerance is None:
            print(f"headline: the table was written on CPU {readme_cpu(text)!r}, this is {cpu_model()!r}: "
                  f"comparing within {tolerance:g}", file=sys.stderr)
        bad = mismatches(report, readme_values(text), tolerance)
    except (OSError, ValueError) as err:
        print(f"headline: {readme}: {err}", file=sys.stderr)
        return 2
    for line in bad:
        print(f"headline: {line}", file=sys.stderr)
    if not bad:
        print(f"headline: the README's numbers equal {a.report}'s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
