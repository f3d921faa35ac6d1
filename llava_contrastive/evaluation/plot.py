"""``llava-contrastive plot RUN_DIR [RUN_DIR ...] --output curves.png``: training curves from
``trainer_state.json`` alone (no model, no evaluation), several runs overlaid, one panel per key.

``RUN_DIR`` is a training output directory (its ``trainer_state.json``, else the one of its highest
``checkpoint-N``) or a ``trainer_state.json`` itself. ``--keys`` picks the logged keys to draw
(default ``ntp_loss contrastive_loss learning_rate``; the trainer also logs ``loss``,
``logit_scale``, ``i2t_acc``, ``t2i_acc``, ``negatives``, ``grad_norm``); ``--labels`` names the
runs in the legend (default: the directory names). Every panel has its own y-axis scaled to its
own values, so a 0.70 -> 0.68 change of the NTP loss shows. A run trained without the contrastive
term logs only ``loss``, which is then its NTP loss: the ``ntp_loss`` panel draws it.

The same drawing makes the evaluation's ``training_curves.png`` (``evaluation/alignment.py``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

TRAINER_STATE = "trainer_state.json"
# transformers' checkpoint directory names (training/checkpointing.py; not imported: it pulls in torch)
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
DEFAULT_KEYS = ("ntp_loss", "contrastive_loss", "learning_rate")
# a run without the contrastive term logs no ntp_loss: its `loss` is the NTP loss
FALLBACK = {"ntp_loss": "loss"}
TITLES = {"ntp_loss": "NTP loss", "contrastive_loss": "contrastive loss", "learning_rate": "learning rate",
          "logit_scale": "logit scale", "i2t_acc": "in-batch i2t accuracy", "t2i_acc": "in-batch t2i accuracy",
          "loss": "total loss"}
# panels of one run's training_curves.png: (title, keys); panels no key of which is logged are left out
RUN_PANELS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("NTP loss", ("ntp_loss",)), ("contrastive loss", ("contrastive_loss",)), ("learning rate", ("learning_rate",)),
    ("logit scale", ("logit_scale",)), ("in-batch accuracy", ("i2t_acc", "t2i_acc")))
Panel = Tuple[str, Sequence[str]]


class UserError(Exception):
    """A path without trainer_state.json, a bad flag: exit code 2 with this message."""


@dataclasses.dataclass(frozen=True)
class Run:
    label: str
    state: Path  # the trainer_state.json read
    logs: List[Dict[str, Any]]  # log_history entries that carry a step


# ---- reading -------------------------------------------------------------------------------------
def find_state(path: Path) -> Path:
    """``path`` itself (a file), ``path/trainer_state.json``, else the one of the highest ``checkpoint-N``."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise UserError(f"{path}: not found (pass a training output directory or a {TRAINER_STATE})")
    if (path / TRAINER_STATE).is_file():
        return path / TRAINER_STATE
    steps = [(int(m.group(1)), c) for c in path.iterdir() if (m := CHECKPOINT_RE.match(c.name))
             and (c / TRAINER_STATE).is_file()]
    if not steps:
        raise UserError(f"{path}: no {TRAINER_STATE} (looked for {path / TRAINER_STATE} and "
                        f"{path}/checkpoint-N/{TRAINER_STATE}); pass a training output directory or the file")
    return max(steps)[1] / TRAINER_STATE


def dir_label(directory: Path) -> str:
    """``run`` for a run directory, ``run/checkpoint-N`` for one of its checkpoints."""
    directory = Path(directory).absolute()
    if CHECKPOINT_RE.match(directory.name):
        return f"{directory.parent.name}/{directory.name}"
    return directory.name


def read_logs(state: Path) -> List[Dict[str, Any]]:
    """The ``log_history`` entries of a trainer_state.json that carry a step."""
    try:
        data = json.loads(Path(state).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{state}: not a readable {TRAINER_STATE} ({err})") from err
    hist = data.get("log_history", []) if isinstance(data, dict) else []
    return [h for h in hist if isinstance(h, dict) and "step" in h]


def load_run(path: Path, label: Optional[str] = None) -> Run:
    state = find_state(Path(path))
    return Run(label or dir_label(state.parent), state, read_logs(state))


def series(logs: Sequence[Dict[str, Any]], key: str) -> Tuple[str, List[float], List[float]]:
    """(key read, steps, values) of ``key`` (``ntp_loss`` falls back to ``loss`` in a run that logs no
    ``ntp_loss``); entries without the key, or with a null or non-numeric value, are skipped."""
    used = key if any(key in h for h in logs) else FALLBACK.get(key, key)
    pts = [(float(h["step"]), float(h[used])) for h in logs
           if isinstance(h.get(used), (int, float)) and not isinstance(h.get(used), bool)]
    return used, [p[0] for p in pts], [p[1] for p in pts]


def logged_keys(runs: Sequence[Run]) -> List[str]:
    """Numeric keys any run logs per step (what --keys can name)."""
    keys = {k for r in runs for h in r.logs for k, v in h.items() if isinstance(v, (int, float)) and k != "step"}
    return sorted(keys)


# ---- drawing -------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _line_label(run: Run, key: str, used: str, many_runs: bool, many_keys: bool) -> str:
    parts = [run.label] if many_runs else []
    if many_keys or used != key:
        parts.append(used if used == key else f"{used} (no {key} logged)")
    return " ".join(parts) or key


def draw(runs: Sequence[Run], panels: Sequence[Panel], title: str):
    """A matplotlib Figure: one panel per (title, keys) that some run logs, each with its own y-axis
    scaled to its values; run i is colour Ci in every panel, a panel's second key is dashed. None when
    no panel has data. The caller saves (``save``)."""
    drawn = [(t, ks) for t, ks in panels if any(series(r.logs, k)[1] for r in runs for k in ks)]
    if not drawn:
        return None
    plt = _plt()
    cols = min(3, len(drawn))
    rows = math.ceil(len(drawn) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.6 * rows + 0.4), squeeze=False)
    flat = list(axes.flat)
    for ax, (name, keys) in zip(flat, drawn):
        for i, run in enumerate(runs):
            for j, key in enumerate(keys):
                used, x, y = series(run.logs, key)
                if x:
                    ax.plot(x, y, color=f"C{i % 10}", ls=("-", "--", ":", "-.")[j % 4], lw=1.2,
                            marker="." if len(x) <= 40 else None,
                            label=_line_label(run, key, used, len(runs) > 1, len(keys) > 1))
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in flat[len(drawn):]:
        fig.delaxes(ax)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def save(fig, path: Path, title: Optional[str] = None):
    """Title (suptitle) and lay out ``fig`` when ``title`` is given, write it to ``path`` and close it;
    returns ``fig``."""
    plt = _plt()
    if title:
        fig.suptitle(title)
        fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def compare_title(runs: Sequence[Run]) -> str:
    return "Training curves: " + ", ".join(r.label for r in runs)


# ---- command -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llava-contrastive plot", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR",
                    help=f"training output directory (or checkpoint-N, or a {TRAINER_STATE})")
    ap.add_argument("--output", required=True, help="figure to write (.png, .pdf, .svg)")
    ap.add_argument("--keys", nargs="+", default=None,
                    help=f"logged keys, one panel each (default: {' '.join(DEFAULT_KEYS)}, those logged)")
    ap.add_argument("--labels", nargs="+", default=None, help="legend name per RUN_DIR (default: directory names)")
    ap.add_argument("--title", default=None, help="figure title (default: names the runs)")
    return ap


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Draw and save; returns {output, runs: [{label, trainer_state, steps}], keys: the panels drawn}."""
    a = build_parser().parse_args(argv)
    if a.labels is not None and len(a.labels) != len(a.runs):
        raise UserError(f"--labels: {len(a.labels)} label(s) for {len(a.runs)} run(s); give one per RUN_DIR")
    runs = [load_run(Path(p), a.labels[i] if a.labels else None) for i, p in enumerate(a.runs)]
    keys = list(a.keys or DEFAULT_KEYS)
    missing = [k for k in keys if not any(series(r.logs, k)[1] for r in runs)]
    if a.keys and missing:
        raise UserError(f"--keys {' '.join(missing)}: logged by none of the runs; logged keys: "
                        f"{', '.join(logged_keys(runs)) or 'none'}")
    keys = [k for k in keys if k not in missing]
    fig = draw(runs, [(TITLES.get(k, k), (k,)) for k in keys], a.title or compare_title(runs))
    if fig is None:
        raise UserError(f"no curves: none of {', '.join(DEFAULT_KEYS)} is logged in "
                        f"{', '.join(str(r.state) for r in runs)}; pass --keys (logged: "
                        f"{', '.join(logged_keys(runs)) or 'none'})")
    save(fig, Path(a.output))
    return {"output": str(a.output), "keys": keys,
            "runs": [{"label": r.label, "trainer_state": str(r.state), "steps": len(r.logs)} for r in runs]}


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        out = run(argv)
    except UserError as err:
        sys.stderr.write(f"llava-contrastive plot: {err}\n")
        return 2
    print(f"wrote {out['output']}: {', '.join(out['keys'])} of {', '.join(r['label'] for r in out['runs'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
