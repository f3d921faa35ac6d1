"""Ablation of the contrastive settings on the tiny assets: ``python -m llava_contrastive.dev.ablate``.

    python -m llava_contrastive.dev.ablate --output_dir runs/ablation --seeds 0 1 2 \
        --configs ntp_only joint_w0.5 siglip text_llm_prompteol

Every configuration trains stage 1 (subprocess ``python -m llava_contrastive.train``) with the same
seed, data, steps, batch and learning rate, then is evaluated on the held-out split
(``llava_contrastive.evaluation.alignment``, >= 1000 pairs, duplicate captions masked). Writes ``ablation.md``,
``ablation.csv`` (one row per configuration x seed plus means), ``ablation.png`` and
``ablation.json``. Runs whose ``report.json`` exists are reused (delete the directory to redo).

Axes beyond the contrastive settings: ``--llms`` (the tiny LLM of each family, built on first use as
``python -m llava_contrastive.tiny --llm mistral`` does), ``--visions`` (``clip``, ``siglip``) and
``--projectors``. ``--host llava`` (default: upstream's train.py, the ``.venv`` stack) takes llama /
mistral, clip, and linear / mlp2x_gelu / mlp3x_gelu; ``--host hf`` (transformers' native LLaVA, run
under ``.venv-hf``) takes llama / mistral / qwen2, clip / siglip, and linear / mlp2x_gelu. Every row is
compared with the ``ntp_only`` row of the same LLM, tower and projector::

    .venv-hf/bin/python -m llava_contrastive.dev.ablate --host hf --output_dir runs/analysis \
        --configs joint_w0.5 --llms llama mistral qwen2 --visions clip siglip --projectors linear mlp2x_gelu
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[2]

# name -> (training flags, evaluation embedding overrides). The baseline is "ntp_only".
CONFIGS: Dict[str, List[str]] = {
    "ntp_only": ["--contrastive_weight", "0"],
    "joint_w0.1": ["--contrastive_weight", "0.1"],
    "joint_w0.25": ["--contrastive_weight", "0.25"],
    "joint_w0.5": ["--contrastive_weight", "0.5"],
    "joint_w1": ["--contrastive_weight", "1.0"],
    "joint_w2": ["--contrastive_weight", "2.0"],
    "joint_w4": ["--contrastive_weight", "4.0"],
    "siglip": ["--contrastive_loss", "siglip"],
    "text_llm_prompteol": ["--contrastive_text_source", "llm", "--contrastive_prompt", "prompteol"],
    "text_llm_none": ["--contrastive_text_source", "llm", "--contrastive_prompt", "none"],
    "text_llm_e5v": ["--contrastive_text_source", "llm", "--contrastive_prompt", "e5v"],
    "image_llm": ["--contrastive_image_source", "llm"],
    "head_linear": ["--contrastive_head", "linear"],
    "infonce_w0.25_head": ["--contrastive_weight", "0.25", "--contrastive_head", "linear"],
    "infonce_w0.5_head": ["--contrastive_weight", "0.5", "--contrastive_head", "linear"],
    "infonce_w1_head": ["--contrastive_weight", "1.0", "--contrastive_head", "linear"],
    "siglip_w0.05": ["--contrastive_loss", "siglip", "--contrastive_weight", "0.05"],
    "siglip_w0.1": ["--contrastive_loss", "siglip", "--contrastive_weight", "0.1"],
    "siglip_w0.2": ["--contrastive_loss", "siglip", "--contrastive_weight", "0.2"],
    "siglip_w0.1_T0.03": ["--contrastive_loss", "siglip", "--contrastive_weight", "0.1",
                          "--contrastive_temperature", "0.03"],
    "siglip_w0.05_head": ["--contrastive_loss", "siglip", "--contrastive_weight", "0.05", "--contrastive_head", "linear"],
    "siglip_w0.1_head": ["--contrastive_loss", "siglip", "--contrastive_weight", "0.1", "--contrastive_head", "linear"],
    "siglip_w0.5_head": ["--contrastive_loss", "siglip", "--contrastive_weight", "0.5", "--contrastive_head", "linear"],
    "siglip_w1_head": ["--contrastive_loss", "siglip", "--contrastive_weight", "1.0", "--contrastive_head", "linear"],
    "proj_linear": ["--mm_projector_type", "linear"],
    "proj_linear_ntp_only": ["--mm_projector_type", "linear", "--contrastive_weight", "0"],
    "proj_mlp2x_gelu": ["--mm_projector_type", "mlp2x_gelu"],
    # prompt study (text embeddings from a text-only LLM pass): a user template beside the named ones
    "text_llm_custom": ["--contrastive_text_source", "llm", "--contrastive_prompt", "the image shows {caption}"],
}
HOST_AXES = {  # host -> (LLM families, vision towers, projector types) it runs
    "llava": (("llama", "mistral"), ("clip",), ("linear", "mlp2x_gelu", "mlp3x_gelu")),
    "hf": (("llama", "mistral", "qwen2"), ("clip", "siglip"), ("linear", "mlp2x_gelu")),
}
DEFAULT_CONFIGS = ["ntp_only", "infonce_w0.25_head", "infonce_w0.5_head", "joint_w0.1", "joint_w0.25", "joint_w0.5", "joint_w1", "joint_w2", "siglip", "text_llm_prompteol",
                   "text_llm_none", "text_llm_e5v", "image_llm", "proj_linear", "proj_linear_ntp_only"]
METRICS = ("i2t@1", "t2i@1", "i2t@5", "modality_gap", "ntp_loss", "train_final_ntp_loss", "s_per_step")


def env(threads: int) -> dict:
    e = dict(os.environ)
    e.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             LLAVA_CONTRASTIVE_QUIET="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
             PYTHONPATH=f"{REPO}{os.pathsep}{e.get('PYTHONPATH', '')}")
    return e


def train_args(assets, out: Path, seed: int, a) -> List[str]:
    length = ["--max_steps", str(a.steps)] if a.steps else ["--num_train_epochs", str(a.epochs)]
    common = [
        "--data_path", str(assets.pretrain_json), "--image_folder", str(assets.image_folder),
        "--mm_projector_type", "mlp2x_gelu", "--output_dir", str(out), *length,
        "--per_device_train_batch_size", str(a.batch), "--gradient_accumulation_steps", "1",
        "--save_strategy", "no", "--learning_rate", str(a.lr), "--weight_decay", "0.", *warmup(assets, a),
        "--lr_scheduler_type", "cosine", "--logging_steps", "1", "--model_max_length", "128",
        "--dataloader_num_workers", "0", "--report_to", "none", "--seed", str(seed),
    ]
    if a.host == "hf":
        host = ["--llm_dir", str(assets.llm_dir), "--vision_dir", str(assets.vision_dir), "--vision_feature_layer",
                "-2", "--disable_tqdm", "true"]
    else:
        host = ["--model_name_or_path", str(assets.llm_dir), "--version", "plain",
                "--vision_tower", str(assets.vision_dir), "--tune_mm_mlp_adapter", "True",
                "--mm_vision_select_layer", "-2", "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False",
                "--evaluation_strategy", "no", "--lazy_preprocess", "True"]
    return host + common + shlex.split(a.extra or "")


def warmup(assets, a) -> List[str]:
    """Upstream's 3% warm-up; transformers 5 has no --warmup_ratio, so the native host gets the steps
    (ceil, as transformers' get_warmup_steps computes them from the ratio)."""
    if a.host != "hf":
        return ["--warmup_ratio", "0.03"]
    steps = a.steps or math.ceil(len(json.loads(Path(assets.pretrain_json).read_text())) / a.batch * a.epochs)
    return ["--warmup_steps", str(math.ceil(0.03 * steps))]


HOST_MODULES = {"llava": ("llava_contrastive.train", "llava_contrastive.eval"),
                "hf": ("llava_contrastive.hosts.hf.train", "llava_contrastive.hosts.hf.eval")}


def eval_args(assets, out: Path, a) -> List[str]:
    model = ["--llm_dir", str(assets.llm_dir), "--vision_dir", str(assets.vision_dir)] if a.host == "hf" else \
        ["--model_name_or_path", str(assets.llm_dir), "--vision_tower", str(assets.vision_dir)]
    return model + ["--projector", str(out), "--data_path", str(assets.heldout_json), "--image_folder",
                    str(assets.image_folder), "--output_dir", str(out / "eval"), "--no_progress"] \
        + (["--max_samples", str(a.max_samples)] if a.max_samples else [])


def run_one(name: str, flags: List[str], seed: int, assets, a) -> dict:
    out = Path(a.output_dir) / "runs" / f"{name.replace(AXIS_SEP, '__').replace('=', '-')}-seed{seed}"
    report_path = out / "eval" / "report.json"
    if report_path.is_file() and not a.force:
        return _row(name, seed, json.loads(report_path.read_text()))
    if a.report_only:
        return {"config": name, "seed": seed, "error": "not run"}
    out.mkdir(parents=True, exist_ok=True)
    log = out / "run.log"
    t0 = time.time()
    train_module, eval_module = HOST_MODULES[a.host]
    cmd = [sys.executable, "-m", train_module, *train_args(assets, out, seed, a), *flags]
    with open(log, "w") as f:
        f.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=REPO, env=env(a.threads), stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        print(f"[ablate] {name} seed {seed}: training failed (exit {proc.returncode}), see {log}", flush=True)
        return {"config": name, "seed": seed, "error": f"train exit {proc.returncode}"}
    ecmd = [sys.executable, "-m", eval_module, *eval_args(assets, out, a)]
    # every run is scored in its own embedding space (run's contrastive_config.json); weight-0 runs in the
    # default one (caption input-embedding mean vs projected-token mean), the space of the default joint run
    with open(log, "a") as f:
        proc = subprocess.run(ecmd, cwd=REPO, env=env(a.threads), stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        print(f"[ablate] {name} seed {seed}: eval failed, see {log}", flush=True)
        return {"config": name, "seed": seed, "error": f"eval exit {proc.returncode}"}
    row = _row(name, seed, json.loads(report_path.read_text()))
    print(f"[ablate] {name:<22} seed {seed}: i2t@1 {row['i2t@1']:.3f} t2i@1 {row['t2i@1']:.3f} "
          f"gap {row['modality_gap']:.3f} ntp {row['ntp_loss']:.4f} ({time.time() - t0:.0f}s)", flush=True)
    return row


def _weight(flags: List[str]) -> float:
    for i, f in enumerate(flags[:-1]):
        if f == "--contrastive_weight":
            return float(flags[i + 1])
    return 0.5


def _row(name: str, seed: int, report: dict) -> dict:
    row = {"config": name, "seed": seed, "n": int(report["n"]), "chance": report["chance"]}
    for k in METRICS:
        row[k] = report.get(k, float("nan"))
    return row


def criterion(row: dict, base: dict) -> Dict[str, bool]:
    """The issue's acceptance test of one run against the NTP-only run of the same seed."""
    return {
        "i2t>=2x_ntp": row["i2t@1"] >= 2 * base["i2t@1"],
        "i2t>=5x_chance": row["i2t@1"] >= 5 * row["chance"],
        "gap<=0.7x_ntp": row["modality_gap"] <= 0.7 * base["modality_gap"],
        "ntp<=1.02x_ntp": row["ntp_loss"] <= 1.02 * base["ntp_loss"],
    }


AXIS_SEP = " | "  # "config | llm=mistral | vision=siglip | projector=linear": one row per combination


def variant_name(config: str, llm: Optional[str], projector: Optional[str], vision: Optional[str] = None) -> str:
    """Row name of ``config`` on an LLM family / vision tower / projector type of the axes."""
    axes = [("llm", llm), ("vision", vision), ("projector", projector)]
    return AXIS_SEP.join([config] + [f"{k}={v}" for k, v in axes if v])


def baseline_name(name: str) -> str:
    """The NTP-only row a row is compared with: same LLM family and projector, weight 0."""
    return AXIS_SEP.join(["ntp_only"] + name.split(AXIS_SEP)[1:])


def summarise(rows: List[dict], configs: List[str]) -> List[dict]:
    base = {(r["config"], r["seed"]): r for r in rows if r["config"].split(AXIS_SEP)[0] == "ntp_only"
            and "error" not in r}
    summary = []
    for name in configs:
        base_by_seed = {seed: r for (config, seed), r in base.items() if config == baseline_name(name)}
        rs = [r for r in rows if r["config"] == name and "error" not in r]
        if not rs:
            summary.append({"config": name, "seeds": 0})
            continue
        s: Dict[str, object] = {"config": name, "seeds": len(rs), "n": rs[0]["n"], "chance": rs[0]["chance"]}
        for k in METRICS:
            vals = [r[k] for r in rs if isinstance(r.get(k), (int, float)) and not math.isnan(r[k])]
            s[k] = statistics.mean(vals) if vals else float("nan")
            s[k + "_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        passes = []
        for r in rs:
            b = base_by_seed.get(r["seed"])
            if b is not None and name != baseline_name(name):
                c = criterion(r, b)
                r.update(c)
                r["pass"] = all(c.values())
                passes.append(r["pass"])
        s["pass"] = f"{sum(passes)}/{len(passes)}" if passes else "-"
        if base_by_seed and name != baseline_name(name):
            pairs = [(r, base_by_seed[r["seed"]]) for r in rs if r["seed"] in base_by_seed]
            if pairs:
                base_i2t = statistics.mean(b["i2t@1"] for _, b in pairs)  # ratio of means (a seed may score 0)
                s["i2t_ratio"] = statistics.mean(r["i2t@1"] for r, _ in pairs) / base_i2t if base_i2t > 0 else float("inf")
                s["gap_change"] = statistics.mean(r["modality_gap"] / b["modality_gap"] - 1 for r, b in pairs)
                s["ntp_change"] = statistics.mean(r["ntp_loss"] / b["ntp_loss"] - 1 for r, b in pairs)
                s.update(paired_differences(pairs))
        summary.append(s)
    return summary


PAIRED = {  # key -> per-seed paired difference of a row r and its ntp_only row b
    "d_i2t": lambda r, b: 100 * (r["i2t@1"] - b["i2t@1"]),  # i2t@1, points
    "d_gap": lambda r, b: r["modality_gap"] - b["modality_gap"],
    "d_ntp": lambda r, b: 100 * (r["ntp_loss"] / b["ntp_loss"] - 1),  # held-out NTP, %
}


def paired_differences(pairs: List[tuple]) -> Dict[str, list]:
    """Per-seed differences against the ntp_only row of the same seed, as [mean, low, high] (95%
    Student-t interval over seeds)."""
    from llava_contrastive.evaluation.stats import t_interval

    return {k: list(t_interval([fn(r, b) for r, b in pairs])) for k, fn in PAIRED.items()}


def _ci(value: Optional[list], p: int = 1) -> str:
    if not value:
        return "-"
    mean, lo, hi = value
    return f"{mean:+.{p}f}" + ("" if math.isnan(lo) else f" [{lo:+.{p}f}, {hi:+.{p}f}]")


def cell(name: str) -> str:
    """A row name as one markdown table cell (the axes' separator is a pipe)."""
    return name.replace(AXIS_SEP, ", ")


def comparison_lines(summary: List[dict]) -> List[str]:
    """One row per (configuration, LLM, tower, projector) against its own ntp_only row."""
    rows = [s for s in summary if s.get("seeds") and "d_i2t" in s]
    if not rows:
        return []
    base = {s["config"]: s for s in summary if s.get("seeds")}
    lines = ["## Joint vs NTP-only per combination", "",
             "Paired by seed against the ntp_only row of the same LLM, tower and projector: mean difference "
             "[95% Student-t interval over seeds].", "",
             "| configuration | LLM | tower | projector | seeds | i2t@1 ntp_only -> this | Δ i2t@1 (points) "
             "| Δ modality gap | Δ held-out NTP (%) |", "|---|---|---|---|---|---|---|---|---|"]
    for s in rows:
        parts = s["config"].split(AXIS_SEP)
        axes = dict(p.split("=", 1) for p in parts[1:])
        b = base.get(baseline_name(s["config"]), {})
        lines.append(f"| {parts[0]} | {axes.get('llm', 'llama')} | {axes.get('vision', 'clip')} | "
                     f"{axes.get('projector', 'mlp2x_gelu')} | {s['seeds']} | {b.get('i2t@1', float('nan')):.3f} -> "
                     f"{s['i2t@1']:.3f} | {_ci(s['d_i2t'])} | {_ci(s['d_gap'], 3)} | {_ci(s['d_ntp'], 2)} |")
    return lines + [""]


def write_outputs(out: Path, rows: List[dict], summary: List[dict], a) -> None:
    fields = ["config", "seed", "n", "chance", *METRICS, "i2t>=2x_ntp", "i2t>=5x_chance", "gap<=0.7x_ntp",
              "ntp<=1.02x_ntp", "pass", "error"]
    with open(out / "ablation.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in sorted(rows, key=lambda r: (r["config"], r["seed"])):
            w.writerow(r)
        for s in summary:
            w.writerow({**{k: s.get(k) for k in fields if k in s}, "seed": "mean", "pass": s.get("pass")})
    length = f"{a.steps} steps" if a.steps else f"{a.epochs} epoch(s)"
    lines = [
        "# Contrastive ablation (tiny assets)", "",
        f"Same data, seeds {' '.join(map(str, a.seeds))}, {length}, batch {a.batch}, lr {a.lr}"
        + (f", extra `{a.extra}`" if a.extra else "")
        + f"; held-out n = {summary[0].get('n', '?') if summary else '?'} pairs (duplicate captions masked). "
        "Values are means over seeds (± sd). Criterion per seed vs ntp_only: i2t@1 >= 2x and >= 5x chance, "
        "gap <= 0.7x, held-out NTP <= 1.02x.", "",
        "| config | i2t@1 | t2i@1 | i2t@1 / ntp_only (ratio of means) | modality gap | gap vs ntp_only | held-out NTP | NTP vs ntp_only "
        "| final train NTP | s/step | criterion |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        if not s.get("seeds"):
            lines.append(f"| {cell(s['config'])} | not run / failed | | | | | | | | | |")
            continue

        def f(k, p=3):
            return f"{s[k]:.{p}f} ± {s[k + '_sd']:.{p}f}" if s.get(k + "_sd") else f"{s[k]:.{p}f}"

        ratio = "-" if "i2t_ratio" not in s else ("n/a (ntp_only 0)" if math.isinf(s["i2t_ratio"]) else f"{s['i2t_ratio']:.1f}x")
        gap = f"{100 * s['gap_change']:+.1f}%" if "gap_change" in s else "-"
        ntp = f"{100 * s['ntp_change']:+.2f}%" if "ntp_change" in s else "-"
        lines.append(f"| {cell(s['config'])} | {f('i2t@1')} | {f('t2i@1')} | {ratio} | {f('modality_gap')} | {gap} | "
                     f"{f('ntp_loss', 4)} | {ntp} | {f('train_final_ntp_loss', 4)} | {s['s_per_step']:.3f} | {s['pass']} |")
    lines += ["", f"Chance level: {summary[0].get('chance', float('nan')):.5f}." if summary else "",
              f"Host: {'transformers-native LLaVA' if a.host == 'hf' else 'upstream LLaVA'}; LLM families: "
              f"{', '.join(a.llms or ['llama'])}; vision towers: {', '.join(a.visions or ['clip'])}; projectors: "
              f"{', '.join(a.projectors or ['mlp2x_gelu'])} (each row is compared with the ntp_only row of the same "
              "family, tower and projector).", ""]
    lines += comparison_lines(summary)
    (out / "ablation.md").write_text("\n".join(lines))
    (out / "ablation.json").write_text(json.dumps({"rows": rows, "summary": summary, "args": vars(a)}, indent=2))
    plot(out / "ablation.png", summary)


def plot(path: Path, summary: List[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [s for s in summary if s.get("seeds")]
    if not ok:
        return
    names = [s["config"] for s in ok]
    x = range(len(ok))
    fig, axes = plt.subplots(3, 1, figsize=(max(7.0, 0.45 * len(ok) + 2), 11), sharex=True)
    for ax, (k, label) in zip(axes, [("i2t@1", "held-out i2t recall@1"), ("modality_gap", "modality gap"),
                                     ("ntp_loss", "held-out NTP loss")]):
        ax.bar(x, [s[k] for s in ok], yerr=[s.get(k + "_sd", 0) for s in ok], capsize=3,
               color=["tab:gray" if n.split(AXIS_SEP)[0] == "ntp_only" else "tab:blue" for n in names])
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.set_title(label)
        if k == "i2t@1":
            ax.axhline(ok[0]["chance"] * 5, ls="--", c="red", lw=1, label="5x chance")
            ax.legend(fontsize=8)
        if k == "ntp_loss":
            lo = min(s[k] for s in ok)
            ax.set_ylim(lo * 0.97, max(s[k] for s in ok) * 1.01)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", required=True)
    p.add_argument("--steps", type=int, default=0, help="max_steps per run (0: --epochs over the train set)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--configs", nargs="+", default=None, help=f"subset of: {' '.join(CONFIGS)}")
    p.add_argument("--custom", action="append", default=[],
                   help="extra configuration NAME='--flag value ...' (repeatable)")
    p.add_argument("--extra", default="", help="flags added to every training run (e.g. '--contrastive_temperature 0.05')")
    p.add_argument("--max_samples", type=int, default=0, help="held-out pairs to evaluate (0: all)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (0: cores // jobs)")
    p.add_argument("--force", action="store_true", help="redo runs that have a report")
    p.add_argument("--report_only", action="store_true", help="train nothing: tabulate the runs that have a report")
    p.add_argument("--tiny_root", default=str(REPO / "playground" / "tiny"))
    p.add_argument("--host", choices=sorted(HOST_AXES), default="llava",
                   help="llava: upstream's train.py (.venv); hf: transformers' native LLaVA (.venv-hf)")
    p.add_argument("--llms", nargs="+", default=None, choices=["llama", "mistral", "qwen2"],
                   help="LLM-family axis: every configuration on the tiny LLM of each family")
    p.add_argument("--visions", nargs="+", default=None, choices=["clip", "siglip"],
                   help="vision-tower axis: every configuration on each tiny tower")
    p.add_argument("--projectors", nargs="+", default=None, choices=["linear", "mlp2x_gelu", "mlp3x_gelu"],
                   help="projector axis: every configuration with each --mm_projector_type")
    a = p.parse_args(argv)
    llms, visions, projectors = HOST_AXES[a.host]
    for flag, given, allowed in (("--llms", a.llms, llms), ("--visions", a.visions, visions),
                                 ("--projectors", a.projectors, projectors)):
        wrong = [v for v in given or [] if v not in allowed]
        if wrong:
            p.error(f"{flag} {' '.join(wrong)}: the {a.host} host runs {', '.join(allowed)}"
                    + ("; qwen2 and siglip run on the native host (--host hf, under .venv-hf)" if a.host == "llava"
                       else "; mlp3x_gelu runs on the upstream host (--host llava)"))
    from llava_contrastive.dev.tiny_models import transformers_major

    if a.host == "hf" and transformers_major() < 5:
        p.error("--host hf needs the native stack (transformers 5): run it with .venv-hf/bin/python "
                "(bash scripts/setup_env_hf.sh)")
    if not a.threads:
        a.threads = max(1, (os.cpu_count() or 1) // a.jobs)
    return a


def run(argv: Optional[Sequence[str]] = None) -> List[dict]:
    a = parse_args(argv)
    from llava_contrastive.dev.tiny import build_family_llm, build_family_vision, build_tiny_assets

    assets = build_tiny_assets(a.tiny_root)
    configs = dict(CONFIGS)
    for c in a.custom:
        name, _, flags = c.partition("=")
        configs[name.strip()] = shlex.split(flags)
    names = list(a.configs or DEFAULT_CONFIGS) + [c.partition("=")[0].strip() for c in a.custom]
    unknown = [n for n in names if n not in configs]
    if unknown:
        sys.exit(f"unknown configuration(s) {unknown}; known: {' '.join(configs)}")
    if a.report_only:
        a.force = False
    if "ntp_only" not in names:
        names = ["ntp_only", *names]
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs, rows_order = [], []
    for llm in a.llms or [None]:
        for vision in a.visions or [None]:
            family_assets = dataclasses.replace(
                assets, llm_dir=build_family_llm(assets, llm) if llm else assets.llm_dir,
                vision_dir=build_family_vision(assets, vision) if vision else assets.vision_dir)
            for projector in a.projectors or [None]:
                extra = ["--mm_projector_type", projector] if projector else []
                for n in names:
                    rows_order.append(variant_name(n, llm, projector, vision))
                    jobs += [(rows_order[-1], configs[n] + extra, s, family_assets) for s in a.seeds]
    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        rows = list(pool.map(lambda j: run_one(j[0], j[1], j[2], j[3], a), jobs))
    summary = summarise(rows, rows_order)
    write_outputs(out, rows, summary, a)
    print((out / "ablation.md").read_text())
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
