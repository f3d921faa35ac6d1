"""Two-stage reproduction: does a contrastive stage 1 make a better VLM after stage 2?

    python -m llava_contrastive.reproduce --output_dir runs/reproduce-tiny --seeds 0 1 2 3 4 --jobs 2
    python -m llava_contrastive.reproduce --output_dir runs/r --arm w1_T0.03="--contrastive_weight 1 --contrastive_temperature 0.03"

For every seed and stage-1 configuration ("arm": ``ntp_only`` = ``--contrastive_weight 0``, ``joint`` =
the default joint loss, more with ``--arm NAME="flags"``) it runs three cells, each a subprocess chain:

  stage1  ``python -m llava_contrastive.train`` (plain template, projector only, ``--seed``) and the
          held-out alignment report ``python -m llava_contrastive.eval`` on its output
  stage2  the identical instruction tuning for every arm (``--version v1``, full fine-tune or
          ``--stage2 lora``, same data, steps and seed, ``--contrastive_weight 0``) from the arm's
          ``mm_projector.bin``
  bench   ``python -m llava_contrastive.vqa`` then ``python -m llava_contrastive.score`` on every
          benchmark of ``--split`` (validation: to choose settings; test: to report them)

then writes ``report.json`` (every number), ``report.md`` (rendered from report.json only) and
``report.png`` (``report-validation.*`` for ``--split validation``): per-benchmark score of each arm and the paired difference with 95% intervals (two-level
bootstrap over seeds and questions, ``llava_contrastive.evaluation.stats``).

Layout of OUTPUT_DIR:

  questions/all_<split>[_first<N>].jsonl     every benchmark's questions in one file (ids ``<benchmark>|<id>``,
                                            absolute image paths): one model load per cell answers them all
  cells/<arm>/seed<k>/stage1/               stage-1 run (mm_projector.bin, config.json, trainer_state.json),
                                            eval/report.json (held-out alignment), run.log, SETTINGS.json, DONE.json
  cells/<arm>/seed<k>/stage2[-lora]/llava-<arm>-seed<k>-<full|lora>/   stage-2 model (upstream's loader takes it)
  cells/<arm>/seed<k>/bench[-lora]-<split>/ answers_<split>.jsonl; <benchmark>_<split>_answers.jsonl (upstream's
                                            answers format, the benchmark's own ids); <benchmark>_<split>.json (scores)
  report.json report.md report.png          (report[-lora][-validation].* for --stage2 lora / --split validation)

A cell is finished when its ``DONE.json`` (written last: commands, settings hash, wall time) exists;
a rerun reuses finished cells, so an interrupted reproduction continues. A finished cell whose
settings changed is refused (exit 2) unless ``--force`` redoes it. ``--jobs N`` runs N (arm, seed)
chains at once with OMP_NUM_THREADS = cores / N.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from llava_contrastive.evaluation.provenance import git_info, versions

REPO = Path(__file__).resolve().parents[2]
MARKER = "DONE.json"
STARTED = "SETTINGS.json"
STAGES = ("stage1", "stage2", "bench")
BASELINE = "ntp_only"
ARMS: Dict[str, List[str]] = {
    "ntp_only": ["--contrastive_weight", "0"],
    "joint": [],  # the trainer's default joint loss
}
BENCHMARKS = ("pope", "mme", "mmbench", "gqa", "textqa")
# per tier: stage-1 / stage-2 steps, batches and learning rates of the embedded default
TIER_DEFAULTS: Dict[str, Dict[str, Any]] = {
    # tiny stage 2: 1,500 steps (2 epochs of the 12k mix); at 300-750 the model had learnt the answer
    # formats but did not yet read the image (colour at chance)
    "tiny": dict(stage1_steps=250, stage1_batch=32, stage1_lr=1e-3,
                 stage2_steps=1500, stage2_batch=16, stage2_lr=1e-3, stage2_lora_lr=2e-3),
    # small: the tiny tier's stage-2 length (not yet measured on this tier with the colour-led mix)
    "small": dict(stage1_steps=250, stage1_batch=32, stage1_lr=1e-3,
                  stage2_steps=1500, stage2_batch=16, stage2_lr=5e-4, stage2_lora_lr=1e-3),
}


class UserError(Exception):
    """A problem with the request (flags, paths, a changed finished cell): exit code 2."""


class CellFailed(Exception):
    pass


# ---------------------------------------------------------------- cells


@dataclass
class Cell:
    """One (arm, seed, stage): commands run in order in ``dir``; finished when ``dir/DONE.json`` exists."""

    arm: str
    seed: int
    stage: str
    dir: Path
    commands: List[List[str]]
    settings: Dict[str, Any] = field(default_factory=dict)  # extra hashed settings (e.g. the stage-1 hash)

    @property
    def name(self) -> str:
        return f"{self.arm}/seed{self.seed}/{self.stage}"

    def hashed(self) -> Dict[str, Any]:
        # the interpreter is not a setting: the same run under another venv path is the same cell
        cmds = [["python" if c == sys.executable else c for c in cmd] for cmd in self.commands]
        return {"commands": cmds, **self.settings}

    def settings_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.hashed(), sort_keys=True).encode()).hexdigest()[:16]


def read_marker(cell: Cell) -> Optional[dict]:
    p = cell.dir / MARKER
    return json.loads(p.read_text()) if p.is_file() else None


def cell_state(cell: Cell) -> str:
    """``"done"`` (finished, same settings), ``"changed"`` (finished, other settings) or ``"todo"``."""
    m = read_marker(cell)
    if m is None:
        return "todo"
    return "done" if m.get("settings_hash") == cell.settings_hash() else "changed"


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def run_cell(cell: Cell, env: Mapping[str, str], *, force: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run ``cell`` unless it is finished with the same settings; return its marker plus ``reused``.

    A finished cell with other settings raises UserError unless ``force`` (then it is redone from
    scratch). An unfinished cell keeps its directory (the trainer and the VQA entry resume) unless it
    was started with other settings.
    """
    state = cell_state(cell)
    h = cell.settings_hash()
    if state == "done":
        return {**read_marker(cell), "reused": True}
    if state == "changed":
        if not force:
            raise UserError(changed_message([cell]))
        shutil.rmtree(cell.dir)
    started = cell.dir / STARTED
    if started.is_file() and json.loads(started.read_text()).get("settings_hash") != h:
        shutil.rmtree(cell.dir)
    cell.dir.mkdir(parents=True, exist_ok=True)
    _write_json(started, {"settings_hash": h, "settings": cell.hashed()})
    logfile = cell.dir / "run.log"
    t0 = time.time()
    log(f"[reproduce] {cell.name}: running ({len(cell.commands)} command(s), log {logfile})")
    with open(logfile, "a") as f:
        for cmd in cell.commands:
            f.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
            f.flush()
            t1 = time.time()
            rc = subprocess.run(cmd, cwd=REPO, env=dict(env), stdout=f, stderr=subprocess.STDOUT).returncode
            f.write(f"# exit {rc} after {time.time() - t1:.1f}s\n")
            if rc != 0:
                raise CellFailed(f"{cell.name}: exit {rc} from `{' '.join(cmd[:4])} ...`; see {logfile}")
    wall = time.time() - t0
    marker = {"arm": cell.arm, "seed": cell.seed, "stage": cell.stage, "settings_hash": h,
              "commands": [shlex.join(c) for c in cell.commands], "settings": cell.hashed(),
              "wall_seconds": round(wall, 2), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "t_start": round(t0, 1), "t_end": round(t0 + wall, 1), "threads": env.get("OMP_NUM_THREADS")}
    _write_json(cell.dir / MARKER, marker)  # last file written: the cell is finished
    log(f"[reproduce] {cell.name}: done in {wall:.0f}s")
    return {**marker, "reused": False}


def settings_diff(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 4) -> List[str]:
    """Short human descriptions of what differs between two ``Cell.hashed()`` dicts."""
    import difflib

    out = []
    oc, nc = old.get("commands", []), new.get("commands", [])
    if len(oc) != len(nc):
        out.append(f"{len(oc)} -> {len(nc)} commands")
    for o, n in zip(oc, nc):
        for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, o, n, autojunk=False).get_opcodes():
            if tag != "equal":
                flag = o[i1 - 1] if i1 > 0 and str(o[i1 - 1]).startswith("--") else ""
                out.append(f"{flag} {' '.join(o[i1:i2]) or '(none)'} -> {' '.join(n[j1:j2]) or '(none)'}".strip())
    out += [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if k != "commands" and old.get(k) != new.get(k)]
    return out[:limit]


def changed_message(cells: Sequence[Cell]) -> str:
    names = ", ".join(c.name for c in cells)
    where = cells[0].dir.parents[3] if cells else "."
    old = (read_marker(cells[0]) or {}).get("settings") if cells else None
    hint = f" ({cells[0].name}: {'; '.join(settings_diff(old, cells[0].hashed()))})" if old else ""
    return (f"finished cell(s) {names} in {where} were run with other settings{hint}: "
            "rerun with --force to redo them, or choose another --output_dir")


def run_chains(chains: Sequence[Sequence[Cell]], env: Mapping[str, str], *, jobs: int = 1, force: bool = False,
               log: Callable[[str], None] = print) -> List[dict]:
    """Run each chain's cells in order, ``jobs`` chains at a time; refuse changed cells before any work.

    Returns one marker (+ ``reused``) per finished cell; a failed chain stops there and the others go on.
    Raises CellFailed listing the failures after every chain has stopped.
    """
    changed = [c for chain in chains for c in chain if cell_state(c) == "changed"]
    if changed and not force:
        raise UserError(changed_message(changed))
    lock = threading.Lock()

    def locked_log(msg: str) -> None:
        with lock:
            log(msg)

    def one(chain: Sequence[Cell]) -> Tuple[List[dict], Optional[str]]:
        out = []
        for c in chain:
            try:
                out.append(run_cell(c, env, force=force, log=locked_log))
            except CellFailed as err:
                locked_log(f"[reproduce] FAILED {err}")
                return out, str(err)
        return out, None

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = list(pool.map(one, chains))
    errors = [e for _, e in results if e]
    if errors:
        raise CellFailed("; ".join(errors))
    return [m for ms, _ in results for m in ms]


def child_env(threads: int) -> Dict[str, str]:
    e = dict(os.environ)
    e.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             LLAVA_CONTRASTIVE_QUIET="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
             PYTHONPATH=f"{REPO}{os.pathsep}{e.get('PYTHONPATH', '')}".rstrip(os.pathsep))
    return e


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Assets:
    """Models and data of one tier (paths), and where its benchmarks lie."""

    tier: str
    root: Path
    llm_dir: Path
    vision_dir: Path
    pretrain_json: Path
    image_folder: Path
    heldout_json: Path
    instruct_json: Path
    instruct_image_folder: Path
    bench_dir: Path


def parse_arm(spec: str) -> Tuple[str, List[str]]:
    """``NAME="--flag value ..."`` -> (NAME, flags)."""
    name, sep, flags = spec.partition("=")
    name = name.strip()
    if not sep or not name or "/" in name or name in STAGES:
        raise UserError(f"--arm {spec!r}: write NAME=\"--flag value ...\" (NAME without '/')")
    flags = flags.strip()
    if len(flags) >= 2 and flags[0] == flags[-1] and flags[0] in "'\"":  # NAME="..." passed without a shell
        flags = flags[1:-1]
    return name, shlex.split(flags)


def stage1_commands(a: argparse.Namespace, assets: Assets, arm_flags: List[str], seed: int, out: Path) -> List[List[str]]:
    py = sys.executable
    train = [py, "-m", "llava_contrastive.train",
             "--model_name_or_path", str(assets.llm_dir), "--version", "plain",
             "--data_path", str(assets.pretrain_json), "--image_folder", str(assets.image_folder),
             "--vision_tower", str(assets.vision_dir), "--mm_projector_type", "mlp2x_gelu",
             "--tune_mm_mlp_adapter", "True", "--mm_vision_select_layer", "-2",
             "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False",
             "--output_dir", str(out), "--num_train_epochs", "1", "--max_steps", str(a.stage1_steps),
             "--per_device_train_batch_size", str(a.stage1_batch), "--per_device_eval_batch_size", "4",
             "--gradient_accumulation_steps", "1", "--evaluation_strategy", "no", "--save_strategy", "no",
             "--learning_rate", str(a.stage1_lr), "--weight_decay", "0.", "--warmup_ratio", "0.03",
             "--lr_scheduler_type", "cosine", "--logging_steps", "1", "--model_max_length", "128",
             "--gradient_checkpointing", "False", "--dataloader_num_workers", "0", "--lazy_preprocess", "True",
             "--report_to", "none", "--seed", str(seed), *shlex.split(a.stage1_extra), *arm_flags]
    evaluate = [py, "-m", "llava_contrastive.eval", "--model_name_or_path", str(assets.llm_dir),
                "--vision_tower", str(assets.vision_dir), "--projector", str(out),
                "--data_path", str(assets.heldout_json), "--image_folder", str(assets.image_folder),
                "--output_dir", str(out / "eval"), "--no_progress", "--no_figures"]
    if a.alignment_samples:
        evaluate += ["--max_samples", str(a.alignment_samples)]
    return [train, evaluate]


def stage2_model_dir(cell_dir: Path, arm: str, seed: int, mode: str) -> Path:
    # upstream's loader picks the architecture from the directory name: "llava" (and "lora" for LoRA)
    return cell_dir / f"llava-{arm}-seed{seed}-{mode}"


def stage2_commands(a: argparse.Namespace, assets: Assets, projector: Path, seed: int, out: Path) -> List[List[str]]:
    lora = a.stage2 == "lora"
    mode = (["--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16", "--mm_projector_lr", "2e-5"]
            if lora else [])
    lr = a.stage2_lora_lr if lora else a.stage2_lr
    return [[sys.executable, "-m", "llava_contrastive.train", *mode,
             "--model_name_or_path", str(assets.llm_dir), "--version", "v1",
             "--data_path", str(assets.instruct_json), "--image_folder", str(assets.instruct_image_folder),
             "--vision_tower", str(assets.vision_dir), "--pretrain_mm_mlp_adapter", str(projector),
             "--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-2",
             "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False",
             "--image_aspect_ratio", "pad", "--group_by_modality_length", "True",
             "--max_steps", str(a.stage2_steps), "--output_dir", str(out), "--num_train_epochs", "1",
             "--per_device_train_batch_size", str(a.stage2_batch), "--per_device_eval_batch_size", "4",
             "--gradient_accumulation_steps", "1", "--evaluation_strategy", "no", "--save_strategy", "no",
             "--learning_rate", str(lr), "--weight_decay", "0.", "--warmup_ratio", "0.03",
             "--lr_scheduler_type", "cosine", "--logging_steps", "1", "--model_max_length", "512",
             "--gradient_checkpointing", "False", "--dataloader_num_workers", "0", "--lazy_preprocess", "True",
             "--report_to", "none", "--seed", str(seed), "--contrastive_weight", "0", *shlex.split(a.stage2_extra)]]


def bench_commands(a: argparse.Namespace, assets: Assets, model_dir: Path, out: Path) -> List[List[str]]:
    """One VQA run over every benchmark's questions (one model load), split back per benchmark, scored."""
    py = sys.executable
    base = ["--model-base", str(assets.llm_dir)] if a.stage2 == "lora" else []
    combined = out / f"answers_{a.split}.jsonl"
    cmds = [[py, "-m", "llava_contrastive.vqa", "--model-path", str(model_dir), *base,
             "--question-file", str(combined_question_file(a)), "--image-folder", "/",
             "--answers-file", str(combined), "--conv-mode", "vicuna_v1", "--temperature", "0",
             "--batch_size", str(a.vqa_batch), "--no_progress", *shlex.split(a.vqa_extra)],
            [py, "-c", "import sys; from llava_contrastive.evaluation.reproduce import split_answers; "
                       "split_answers(sys.argv[1], sys.argv[2], sys.argv[3])", str(combined), str(out), a.split]]
    for b in a.benchmarks:
        cmds.append([py, "-m", "llava_contrastive.score", "--benchmark", b, "--bench_dir", str(assets.bench_dir),
                     "--answers_file", str(out / f"{b}_{a.split}_answers.jsonl"), "--split", a.split,
                     "--output", str(out / f"{b}_{a.split}.json"), *(["--answered_only"] if a.max_questions else [])])
    return cmds


def combined_question_file(a: argparse.Namespace) -> Path:
    tag = f"_first{a.max_questions}" if a.max_questions else ""
    return Path(a.output_dir).absolute() / "questions" / f"all_{a.split}{tag}.jsonl"


def combined_id(benchmark: str, question_id: Any) -> str:
    return f"{benchmark}|{json.dumps(question_id)}"


def split_answers(combined: str, out_dir: str, split: str) -> Dict[str, int]:
    """Answers of the combined question file -> ``<benchmark>_<split>_answers.jsonl`` with the
    benchmark's own question ids (the format ``llava_contrastive.score`` and upstream's tools read)."""
    per: Dict[str, List[str]] = {}
    with open(combined, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                bench, _, qid = str(rec["question_id"]).partition("|")
                rec["question_id"] = json.loads(qid)
                per.setdefault(bench, []).append(json.dumps(rec) + "\n")
    for bench, lines in per.items():
        Path(out_dir, f"{bench}_{split}_answers.jsonl").write_text("".join(lines), encoding="utf-8")
    return {b: len(v) for b, v in per.items()}


def plan(a: argparse.Namespace, assets: Assets, arms: Mapping[str, List[str]]) -> List[List[Cell]]:
    """One chain (stage1 -> stage2 -> bench) per (arm, seed)."""
    out = Path(a.output_dir).absolute()
    common = {"tier": a.tier, "assets": asset_fingerprint(assets)}
    chains = []
    for seed in a.seeds:
        for arm, flags in arms.items():
            d = out / "cells" / arm / f"seed{seed}"
            s1 = Cell(arm, seed, "stage1", d / "stage1", stage1_commands(a, assets, flags, seed, d / "stage1"),
                      dict(common))
            mode = "" if a.stage2 == "full" else f"-{a.stage2}"  # full and LoRA stage 2 can share a directory
            s2dir = d / f"stage2{mode}"
            model = stage2_model_dir(s2dir, arm, seed, a.stage2)
            s2 = Cell(arm, seed, "stage2", s2dir,
                      stage2_commands(a, assets, d / "stage1" / "mm_projector.bin", seed, model),
                      {**common, "stage1": s1.settings_hash()})
            bdir = d / f"bench{mode}-{a.split}"
            bench = Cell(arm, seed, "bench", bdir, bench_commands(a, assets, model, bdir),
                         {**common, "stage2": s2.settings_hash(), "max_questions": a.max_questions})
            chains.append([s1, s2, bench])
    return chains


def asset_fingerprint(assets: Assets) -> Dict[str, Any]:
    """What identifies the tier's assets: their STAMP.json (seed, format, settings), without timings."""
    p = assets.root / "STAMP.json"
    if not p.is_file():
        return {"root": str(assets.root)}
    stamp = json.loads(p.read_text())
    stamp.pop("metrics", None)
    return stamp


# ---------------------------------------------------------------- report

ALIGNMENT_KEYS = ("i2t@1", "t2i@1", "modality_gap", "ntp_loss")


def _records(path: Path) -> Optional[int]:
    try:
        return len(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def mean(xs: Sequence[float]) -> Optional[float]:
    xs = [x for x in xs if isinstance(x, (int, float))]
    return sum(xs) / len(xs) if xs else None


def build_report(a: argparse.Namespace, argv: Sequence[str], assets: Assets, arms: Mapping[str, List[str]],
                 chains: Sequence[Sequence[Cell]], markers: Sequence[dict], wall: float) -> Dict[str, Any]:
    """Everything report.md and report.png show, read back from the cells' files."""
    from llava_contrastive.evaluation.stats import compare

    results: Dict[str, Dict[int, Dict[str, Any]]] = {}
    scores: Dict[str, Dict[str, Dict[str, Any]]] = {}
    alignment: Dict[str, Dict[str, Any]] = {}
    for s1, _, bench in chains:
        rep = s1.dir / "eval" / "report.json"
        if rep.is_file():
            r = json.loads(rep.read_text())
            alignment.setdefault(s1.arm, {})[str(s1.seed)] = {k: r.get(k) for k in ALIGNMENT_KEYS}
        if cell_state(bench) != "done":
            continue
        for b in a.benchmarks:
            sc = json.loads((bench.dir / f"{b}_{a.split}.json").read_text())
            units = units_from_score(b, sc)
            results.setdefault(bench.arm, {}).setdefault(bench.seed, {})[b] = units
            scores.setdefault(bench.arm, {}).setdefault(str(bench.seed), {})[b] = {
                "headline": units.score(), "metrics": headline_metrics(sc)}
    for arm, per_seed in alignment.items():
        per_seed_mean = {k: mean([v[k] for v in per_seed.values()]) for k in ALIGNMENT_KEYS}
        alignment[arm] = {"per_seed": per_seed, "mean": per_seed_mean}
    comparisons = []
    for arm in arms:
        if arm != a.baseline and arm in results and a.baseline in results:
            comparisons.append(compare(results, a.baseline, arm, draws=a.bootstrap_draws,
                                       seed=a.bootstrap_seed).as_dict())
    cells = [{"arm": m["arm"], "seed": m["seed"], "stage": m["stage"], "wall_seconds": m["wall_seconds"],
              "reused": m["reused"], "settings_hash": m["settings_hash"]} for m in markers]
    starts = [m["t_start"] for m in markers if "t_start" in m]
    ends = [m["t_end"] for m in markers if "t_end" in m]
    n_questions = {b: len(u.ids) for per_seed in results.values() for seeds in per_seed.values()
                   for b, u in seeds.items()}
    return {
        "title": f"Two-stage reproduction ({a.tier} tier, {a.split} split)",
        "command": "python -m llava_contrastive.reproduce " + shlex.join(list(argv)),
        "tier": a.tier, "split": a.split, "baseline": a.baseline, "arms": {k: shlex.join(v) for k, v in arms.items()},
        "seeds": list(a.seeds), "benchmarks": list(a.benchmarks),
        "steps": {"stage1": a.stage1_steps, "stage2": a.stage2_steps},
        "batch": {"stage1": a.stage1_batch, "stage2": a.stage2_batch},
        "learning_rate": {"stage1": a.stage1_lr, "stage2": a.stage2_lora_lr if a.stage2 == "lora" else a.stage2_lr},
        "stage2_mode": a.stage2, "extra": {"stage1": a.stage1_extra, "stage2": a.stage2_extra},
        "data_sizes": {"stage1_train_records": _records(assets.pretrain_json),
                       "stage1_heldout_records": _records(assets.heldout_json),
                       "stage2_instruct_records": _records(assets.instruct_json),
                       "question_units": n_questions, "max_questions": a.max_questions},
        "assets": {"root": str(assets.root), "fingerprint": asset_fingerprint(assets)},
        "versions": versions(), "git": git_info(),
        # as the cells ran: --report_only ran nothing, so its own --jobs / --threads describe no cell
        "jobs": None if a.report_only else a.jobs,
        "threads_per_job": sorted({str(m["threads"]) for m in markers if m.get("threads")}) or
        (None if a.report_only else [str(a.threads)]),
        "bootstrap": {"draws": a.bootstrap_draws, "seed": a.bootstrap_seed, "level": 0.95},
        "cells": cells,
        "wall_seconds": {
            **{f"{st}_mean_per_cell": mean([c["wall_seconds"] for c in cells if c["stage"] == st]) for st in STAGES},
            "cells_sum": round(sum(c["wall_seconds"] for c in cells), 1),
            # first cell's start to last cell's end (includes any pause between interrupted invocations)
            "span": round(max(ends) - min(starts), 1) if starts and ends else None,
            "this_invocation": round(wall, 1),
        },
        "alignment": alignment, "scores": scores, "comparisons": comparisons,
    }


def _f(x: Optional[float], p: int = 1, sign: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.{p}f}" if sign else f"{x:.{p}f}"


def _iv(iv: Mapping[str, float], sign: bool = False) -> str:
    return f"{_f(iv['estimate'], 1, sign)} [{_f(iv['low'], 1, sign)}, {_f(iv['high'], 1, sign)}]"


def report_stem(split: str, stage2: str = "full") -> str:
    """``report`` for the test split after a full stage 2; ``report[-lora][-validation]`` beside it."""
    return "-".join(["report"] + ([stage2] if stage2 != "full" else []) + ([split] if split != "test" else []))


def _parallelism(r: Mapping[str, Any]) -> str:
    jobs, threads = r.get("jobs"), r.get("threads_per_job")
    if isinstance(threads, list):
        threads = "/".join(threads) if threads else None
    if jobs is None and threads is None:
        return ""
    return f" with {jobs if jobs is not None else '?'} job(s) x {threads if threads is not None else '?'} thread(s)"


def render_markdown(r: Mapping[str, Any]) -> str:
    """report.md from report.json alone (no number is computed or typed here)."""
    lines = [f"# {r['title']}", "", f"Command: `{r['command']}`", "",
             f"Seeds {' '.join(map(str, r['seeds']))}; stage 1 {r['steps']['stage1']} steps (batch {r['batch']['stage1']}, "
             f"lr {r['learning_rate']['stage1']}); stage 2 {r['stage2_mode']} fine-tune {r['steps']['stage2']} steps "
             f"(batch {r['batch']['stage2']}, lr {r['learning_rate']['stage2']}), identical for every arm; "
             f"benchmarks on the {r['split']} split.", "",
             "Arms (stage-1 flags): " + "; ".join(f"`{k}` = `{v or '(default joint loss)'}`" for k, v in r["arms"].items()),
             ""]
    if len(r["comparisons"]) > 1:
        first = r["comparisons"][0]
        benches = [*first["benchmarks"], first["average_key"]]
        lines += [f"## Every arm against {first['arm_a']}", "",
                  "Difference in score points, [95% interval]; the sections below give each arm's scores.", "",
                  "| arm | " + " | ".join("**average**" if x == first["average_key"] else x for x in benches) + " |",
                  "|---" * (len(benches) + 1) + "|"]
        for c in r["comparisons"]:
            lines.append(f"| {c['arm_b']} | " + " | ".join(_iv(c["diff"][x], sign=True) for x in benches) + " |")
        lines.append("")
    for c in r["comparisons"]:
        a, b = c["arm_a"], c["arm_b"]
        lines += [f"## {b} vs {a}", "",
                  f"Scores 0-100 (mean over {len(c['seeds'])} seed(s)); [95% interval], two-level paired bootstrap "
                  f"({c['draws']} draws: seeds, then questions within each seed).", "",
                  f"| benchmark | questions | {a} | {b} | {b} - {a} |", "|---|---|---|---|---|"]
        for bench in [*c["benchmarks"], c["average_key"]]:
            n = c["n_units"].get(bench, "")
            name = "**average**" if bench == c["average_key"] else bench
            lines.append(f"| {name} | {n} | {_iv(c['score_a'][bench])} | {_iv(c['score_b'][bench])} "
                         f"| {_iv(c['diff'][bench], sign=True)} |")
        lines.append("")
    if r.get("scores"):
        benches = list(r["benchmarks"])
        lines += ["## Scores per arm and seed", "", "Each benchmark's headline score (0-100) of every finished chain.",
                  "", "| arm | seed | " + " | ".join(benches) + " |", "|---" * (len(benches) + 2) + "|"]
        for arm, per_seed in r["scores"].items():
            for seed, per_bench in sorted(per_seed.items(), key=lambda kv: int(kv[0])):
                lines.append(f"| {arm} | {seed} | " + " | ".join(_f((per_bench.get(b) or {}).get("headline"))
                                                              for b in benches) + " |")
        lines.append("")
    if r["alignment"]:
        lines += ["## Stage-1 held-out alignment (mean over seeds)", "",
                  "| arm | " + " | ".join(ALIGNMENT_KEYS) + " |", "|---" * (len(ALIGNMENT_KEYS) + 1) + "|"]
        for arm, al in r["alignment"].items():
            lines.append(f"| {arm} | " + " | ".join(_f(al["mean"][k], 4) for k in ALIGNMENT_KEYS) + " |")
        lines.append("")
    w = r["wall_seconds"]
    lines += ["## Cost", "",
              "Mean wall time per cell: " + ", ".join(f"{st} {_f(w.get(f'{st}_mean_per_cell'), 0)} s" for st in STAGES)
              + f"; all cells {_f(w['cells_sum'], 0)} s of work; first cell start to last cell end "
              f"{_f(w.get('span'), 0)} s" + _parallelism(r) + f" (this invocation {_f(w['this_invocation'], 0)} s; "
              "cells run in several invocations or on several machines make the span longer than the work).", "",
              "## Provenance", "",
              f"Data: {r['data_sizes']['stage1_train_records']} stage-1 records, "
              f"{r['data_sizes']['stage1_heldout_records']} held-out, {r['data_sizes']['stage2_instruct_records']} stage-2 "
              "records; questions (scoring units) per benchmark: "
              + ", ".join(f"{k} {v}" for k, v in r["data_sizes"]["question_units"].items()) + ".",
              "Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items())
              + f"; git {r['git']['commit']}{' (uncommitted changes)' if r['git']['dirty'] else ''}.", "",
              f"Every number above is read from {report_stem(r['split'], r['stage2_mode'])}.json; figure: "
              f"{report_stem(r['split'], r['stage2_mode'])}.png.", ""]
    return "\n".join(lines)


def plot_report(r: Mapping[str, Any], path: Path) -> bool:
    """Per-benchmark score of each arm and the paired difference, with 95% intervals."""
    if not r["comparisons"]:
        return False
    from llava_contrastive.evaluation import plot as curves

    plt = curves._plt()
    comps = r["comparisons"]
    keys = [*comps[0]["benchmarks"], comps[0]["average_key"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    arms = [comps[0]["arm_a"]] + [c["arm_b"] for c in comps]
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        ivs = comps[0]["score_a"] if i == 0 else comps[i - 1]["score_b"]
        est = [ivs[k]["estimate"] for k in keys]
        err = [[ivs[k]["estimate"] - ivs[k]["low"] for k in keys], [ivs[k]["high"] - ivs[k]["estimate"] for k in keys]]
        ax1.bar([j + (i - (len(arms) - 1) / 2) * width for j in range(len(keys))], est, width, yerr=err, capsize=3,
                label=arm, color="tab:gray" if i == 0 else None)
    ax1.set_xticks(range(len(keys)))
    ax1.set_xticklabels(keys, rotation=30, ha="right")
    ax1.set_ylabel("score (0-100)")
    ax1.set_title(f"score per benchmark ({r['split']} split, 95% interval)")
    ax1.legend(fontsize=8)
    width = 0.8 / len(comps)
    for i, c in enumerate(comps):
        d = c["diff"]
        est = [d[k]["estimate"] for k in keys]
        err = [[d[k]["estimate"] - d[k]["low"] for k in keys], [d[k]["high"] - d[k]["estimate"] for k in keys]]
        ax2.bar([j + (i - (len(comps) - 1) / 2) * width for j in range(len(keys))], est, width, yerr=err, capsize=3,
                label=f"{c['arm_b']} - {c['arm_a']}")
    ax2.axhline(0, color="black", lw=0.8)
    ax2.set_xticks(range(len(keys)))
    ax2.set_xticklabels(keys, rotation=30, ha="right")
    ax2.set_ylabel("paired difference (points)")
    ax2.set_title(f"difference vs {comps[0]['arm_a']} ({len(comps[0]['seeds'])} seed(s), 95% interval)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    curves.save(fig, path)
    return True


# ---------------------------------------------------------------- benchmarks (interface of vqa / score)


def pope_labels(bench_dir: Path, split: str) -> Dict[str, str]:
    from llava_contrastive.evaluation import benchmarks as B

    coco = B.bench_files(bench_dir, "pope", split).annotation
    return {str(r["question_id"]): r["label"] for cat in B.POPE_CATEGORIES
            for r in B.read_jsonl(coco / f"coco_pope_{cat}.json")}


def units_from_score(benchmark: str, score: Mapping[str, Any]):
    """The scoring units of one ``llava_contrastive.score`` output, such that their metric equals the
    output's ``primary`` (checked): POPE = mean over its categories of F1 (units: questions as
    tp/fp/fn rows); MME = mean over categories of (acc + acc+)/2 (units: images, each worth the mean
    of its two answers' correctness and of both being right); MMBench = circular accuracy (units:
    questions with all rotations); GQA / textqa = exact-match accuracy (units: questions)."""
    from llava_contrastive.evaluation.stats import BenchmarkUnits

    qs = score["questions"]
    if benchmark == "pope":
        labels = pope_labels(Path(score["bench_dir"]), score["split"])
        table = {(1, "yes"): [1, 0, 0], (1, "no"): [0, 0, 0], (0, "no"): [0, 1, 0], (0, "yes"): [0, 0, 1]}
        units = BenchmarkUnits("f1", [str(q["question_id"]) for q in qs],
                               [table[(int(q["correct"]), labels[str(q["question_id"])])] for q in qs],
                               categories=[q["category"] for q in qs])
    elif benchmark == "mme":
        groups: Dict[str, List[int]] = {}
        cats: Dict[str, str] = {}
        for q in qs:
            groups.setdefault(q["group"], []).append(int(q["correct"]))
            cats[q["group"]] = q["category"]
        ids = list(groups)
        units = BenchmarkUnits("mean", ids, [[(sum(v) / len(v) + all(v)) / 2] for v in groups.values()],
                               categories=[cats[g] for g in ids])
    else:
        units = BenchmarkUnits("mean", [str(q["question_id"]) for q in qs], [[int(q["correct"])] for q in qs])
    if abs(units.score() - float(score["primary"])) > 1e-6:
        raise ValueError(f"{benchmark}: units give {units.score():.6f} but the scorer's primary is "
                         f"{score['primary']:.6f} (unequal MME pairs?)")
    return units


def headline_metrics(score: Mapping[str, Any]) -> Dict[str, Any]:
    """The scorer's primary number and its top-level scalar metrics."""
    m = {k: v for k, v in score["metrics"].items() if isinstance(v, (int, float))}
    return {"primary": score["primary"], **m}


def subset_questions(benchmark: str, questions: Sequence[dict], n: int, pair_of: Mapping[str, str]) -> List[dict]:
    """About ``n`` questions, whole scoring groups only (MME image pairs, MMBench rotations), taken
    round-robin over categories in file order, so every category and group stays scorable."""
    from llava_contrastive.evaluation import benchmarks as B

    def group(q: dict) -> str:
        qid = str(q["question_id"])
        if benchmark == "mme":
            return pair_of[qid]
        if benchmark == "mmbench":
            return str(int(qid) % B.MMBENCH_ROTATION_OFFSET)
        return qid

    by_cat: Dict[str, Dict[str, List[dict]]] = {}
    for q in questions:
        by_cat.setdefault(str(q.get("category", "")), {}).setdefault(group(q), []).append(q)
    queues = [list(g.values()) for g in by_cat.values()]
    chosen: List[dict] = []
    while len(chosen) < n and any(queues):
        for qu in queues:
            if qu and len(chosen) < n:
                chosen += qu.pop(0)
    keep = {id(q) for q in chosen}
    return [q for q in questions if id(q) in keep]  # file order


def prepare_questions(a: argparse.Namespace, assets: Assets) -> Dict[str, int]:
    """Write the combined question file of every benchmark (``--max_questions`` subsets when set):
    ids ``<benchmark>|<id>``, absolute image paths. Returns questions per benchmark."""
    from llava_contrastive.evaluation import benchmarks as B

    rows, sizes = [], {}
    for b in a.benchmarks:
        f = B.bench_files(assets.bench_dir, b, a.split)
        if not f.question_file.is_file():
            raise UserError(f"{f.question_file} not found: build the benchmarks with "
                            f"`python -m llava_contrastive.tiny --tier {a.tier}` (or point --assets_root at them)")
        qs = B.read_jsonl(f.question_file)
        if a.max_questions:
            pair_of = ({str(r["question_id"]): f"{r['category']}/{r['pair_id']}" for r in B.read_jsonl(f.annotation)}
                       if b == "mme" else {})
            qs = subset_questions(b, qs, a.max_questions, pair_of)
        for q in qs:
            q = {**q, "question_id": combined_id(b, q["question_id"])}
            if q.get("image"):
                q["image"] = str(Path(f.image_folder, q["image"]).absolute())
            rows.append(json.dumps(q) + "\n")
        sizes[b] = len(qs)
    p = combined_question_file(a)
    p.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(rows)
    if not p.is_file() or p.read_text() != text:
        p.write_text(text)
    return sizes


# ---------------------------------------------------------------- archive
# What a finished cell needs to be reused and reported without its models: its markers, the stage-1
# alignment report and trainer log, the benchmark scores (per question); of stage 2, the markers only.
ARCHIVED = {"stage1": ("eval/report.json", "trainer_state.json", "config.json"),
            "stage2": (),
            "bench": ("*_validation.json", "*_test.json")}


def archive_cells(chains: Sequence[Sequence[Cell]], out: Path, dest: Path) -> int:
    """Copy the small files of every finished cell (``ARCHIVED``, DONE.json, SETTINGS.json) from ``out``
    to ``dest`` under the same relative paths; returns the number of cells archived. Copied back into
    the same ``--output_dir`` path (the cells' settings name absolute paths), they make a rerun reuse
    those cells (and ``--report_only`` report them) on another machine, without the models (hundreds
    of kilobytes per chain instead of megabytes)."""
    n = 0
    for chain in chains:
        for cell in chain:
            if cell_state(cell) != "done":
                continue
            rel = cell.dir.relative_to(out)
            patterns = (MARKER, STARTED, *ARCHIVED[cell.stage])
            for pattern in patterns:
                for src in sorted(cell.dir.glob(pattern)):
                    target = dest / rel / src.relative_to(cell.dir)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, target)
            n += 1
    return n


# ---------------------------------------------------------------- entry


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llava_contrastive.reproduce", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", required=True, help="reproduction directory (cells/, report.*)")
    p.add_argument("--tier", choices=sorted(TIER_DEFAULTS), default="tiny", help="asset tier (default tiny)")
    p.add_argument("--assets_root", default=None, help="asset directory (default playground/<tier>)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--arms", nargs="+", default=None, help=f"built-in arms to run (default: {' '.join(ARMS)})")
    p.add_argument("--arm", action="append", default=[], metavar='NAME="FLAGS"',
                   help="an extra stage-1 configuration, e.g. w1=\"--contrastive_weight 1\" (repeatable)")
    p.add_argument("--baseline", default=BASELINE, help="the arm every other arm is compared with")
    p.add_argument("--split", choices=["validation", "test"], default="test",
                   help="benchmark split: validation to choose settings, test to report them")
    p.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS), choices=list(BENCHMARKS))
    p.add_argument("--max_questions", type=int, default=0, help="first N questions per benchmark (0: all; smoke runs)")
    p.add_argument("--stage2", choices=["full", "lora"], default="full", help="stage-2 fine-tune (default full)")
    for k, v in TIER_DEFAULTS["tiny"].items():
        p.add_argument(f"--{k}", type=type(v), default=None, help=f"default per tier (tiny: {v})")
    p.add_argument("--stage1_extra", default="", help="flags added to every stage-1 run")
    p.add_argument("--stage2_extra", default="", help="flags added to every stage-2 run")
    p.add_argument("--alignment_samples", type=int, default=0, help="held-out pairs in the stage-1 report (0: all)")
    p.add_argument("--vqa_batch", type=int, default=16, help="--batch_size of the VQA entry")
    p.add_argument("--vqa_extra", default="", help="flags added to every VQA run (e.g. '--max_new_tokens 16')")
    p.add_argument("--jobs", type=int, default=1, help="(arm, seed) chains run at once")
    p.add_argument("--threads", type=int, default=0, help="OMP threads per job (0: cores // jobs)")
    p.add_argument("--force", action="store_true", help="redo finished cells whose settings changed")
    p.add_argument("--report_only", action="store_true", help="run nothing; report the finished cells")
    p.add_argument("--archive", metavar="DIR", help="also copy the small files of every finished cell (markers, "
                   "stage-1 reports, benchmark scores; no models) to DIR; copied back into --output_dir, a rerun "
                   "reuses those cells")
    p.add_argument("--bootstrap_draws", type=int, default=2000)
    p.add_argument("--bootstrap_seed", type=int, default=0)
    a = p.parse_args(list(argv))
    for k, v in TIER_DEFAULTS[a.tier].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if not a.threads:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        a.threads = max(1, cores // max(1, a.jobs))
    if len(set(a.seeds)) != len(a.seeds):
        raise UserError(f"--seeds {a.seeds}: a seed is listed twice")
    return a


def select_arms(a: argparse.Namespace) -> Dict[str, List[str]]:
    unknown = [n for n in (a.arms or []) if n not in ARMS]
    if unknown:
        raise UserError(f"--arms {' '.join(unknown)}: unknown; built-in arms are {' '.join(ARMS)} "
                        "(define others with --arm NAME=\"flags\")")
    arms = {n: ARMS[n] for n in (a.arms or ARMS)}
    for spec in a.arm:
        name, flags = parse_arm(spec)
        if name in arms:
            raise UserError(f"--arm {name}: the name is taken; choose another")
        arms[name] = flags
    if a.baseline not in arms:
        raise UserError(f"--baseline {a.baseline}: not among the arms {' '.join(arms)}")
    return arms


def load_assets(a: argparse.Namespace) -> Assets:
    """Build (or reuse) the tier's assets (``python -m llava_contrastive.tiny [--tier small]``)."""
    from llava_contrastive.dev.tiny import TIER_ROOTS, build_tiny_assets

    root = Path(a.assets_root or REPO / TIER_ROOTS[a.tier]).absolute()
    print(f"[reproduce] assets ({a.tier} tier) in {root} (built on first use)", flush=True)
    t = build_tiny_assets(root, tier=a.tier)
    # stage 2 trains on the large mix that teaches the benchmarks' answer formats
    return Assets(a.tier, t.root, t.llm_dir, t.vision_dir, t.pretrain_json, t.image_folder, t.heldout_json,
                  t.instruct_large_json, t.instruct_image_folder, t.eval_root)


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run (or continue) the reproduction; returns report.json's content. Raises UserError / CellFailed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    t0 = time.time()
    a = parse_args(argv)
    arms = select_arms(a)
    out = Path(a.output_dir).absolute()
    assets = load_assets(a)
    chains = plan(a, assets, arms)
    env = child_env(a.threads)
    if a.report_only:
        markers = [{**read_marker(c), "reused": True} for ch in chains for c in ch if cell_state(c) == "done"]
    else:
        changed = [c for ch in chains for c in ch if cell_state(c) == "changed"]
        if changed and not a.force:
            raise UserError(changed_message(changed))
        out.mkdir(parents=True, exist_ok=True)
        prepare_questions(a, assets)
        print(f"[reproduce] {len(chains)} chain(s) x {len(STAGES)} cells in {out}; {a.jobs} job(s) x "
              f"{a.threads} thread(s)", flush=True)
        markers = run_chains(chains, env, jobs=a.jobs, force=a.force,
                             log=lambda m: print(m, flush=True))
    report = build_report(a, argv, assets, arms, chains, markers, time.time() - t0)
    out.mkdir(parents=True, exist_ok=True)
    stem = report_stem(a.split, a.stage2)
    _write_json(out / f"{stem}.json", report)
    (out / f"{stem}.md").write_text(render_markdown(json.loads((out / f"{stem}.json").read_text())))
    plot_report(report, out / f"{stem}.png")
    if a.archive:
        n = archive_cells(chains, out, Path(a.archive).absolute())
        print(f"[reproduce] archived {n} finished cell(s) to {a.archive}", flush=True)
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        run(argv)
    except UserError as err:
        sys.stderr.write(f"reproduce: {err}\n")
        return 2
    except CellFailed as err:
        sys.stderr.write(f"reproduce: a cell failed: {err}\n(rerun the same command to continue; finished cells are kept)\n")
        return 1
    a = parse_args(list(sys.argv[1:] if argv is None else argv))
    out = Path(a.output_dir) / report_stem(a.split, a.stage2)
    print(out.with_suffix(".md").read_text())
    print(f"reproduce: {out}.md  {out}.json  {out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
