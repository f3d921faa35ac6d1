"""Tiny offline assets for LLaVA stage-1 tests: ``python -m llava_contrastive.tiny``.

Builds, deterministically from a seed and in about a minute on 2 CPU cores:

    <root>/
      STAMP.json                               seed, format version, settings, metrics (written last)
      models/vicuna-tiny/                      LlamaForCausalLM + slow LlamaTokenizer (SentencePiece)
      models/clip-vit-tiny/                    CLIPVisionModel (64px, patch 16) + CLIPImageProcessor
      data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json   stage-1 train records (upstream format)
      data/LLaVA-Pretrain/heldout.json                  held-out records (captions unseen in train)
      data/LLaVA-Pretrain/images/NNNNN/NNNNNNNNN.jpg
      data/llava_v1_5_mix665k.json                      stage-2 instruction mix (multi-turn + text-only)
      data/coco/train2017/NNNNNNNNNNNN.jpg

The build goes into ``<root>.tmp-<pid>`` and is renamed into place, under an fcntl lock, so
parallel processes never see a half-built tree; a matching ``STAMP.json`` is a cache hit.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Union

FORMAT_VERSION = 2  # bump whenever generated content changes
STAMP_NAME = "STAMP.json"

DEFAULT_SETTINGS: Dict[str, Any] = {
    "n_train": 8000,
    "n_heldout": 1200,
    "n_instruct": 400,
    "text_only_frac": 0.1,
    "vocab_size": 512,
    "lm_steps": 500,
    "lm_batch_size": 32,
    "lm_lr": 3e-3,
    "vision_steps": 700,
    "vision_batch_size": 64,
    "vision_lr": 2e-3,
}


@dataclass(frozen=True)
class TinyAssets:
    root: Path
    llm_dir: Path
    vision_dir: Path
    data_root: Path
    pretrain_json: Path
    image_folder: Path
    heldout_json: Path
    instruct_json: Path
    instruct_image_folder: Path

    @classmethod
    def at(cls, root: Union[str, Path]) -> "TinyAssets":
        root = Path(root).absolute()
        data = root / "data"
        pre = data / "LLaVA-Pretrain"
        return cls(
            root=root,
            llm_dir=root / "models" / "vicuna-tiny",
            vision_dir=root / "models" / "clip-vit-tiny",
            data_root=data,
            pretrain_json=pre / "blip_laion_cc_sbu_558k.json",
            image_folder=pre / "images",
            heldout_json=pre / "heldout.json",
            instruct_json=data / "llava_v1_5_mix665k.json",
            instruct_image_folder=data,
        )

    @property
    def stamp(self) -> Dict[str, Any]:
        return read_stamp(self.root) or {}


def read_stamp(root: Union[str, Path]) -> Optional[Dict[str, Any]]:
    try:
        with open(Path(root) / STAMP_NAME, "r", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _stamp_key(seed: int, settings: Dict[str, Any]) -> Dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "seed": seed, "settings": settings}


def _stamp_matches(root: Path, key: Dict[str, Any]) -> bool:
    st = read_stamp(root)
    return st is not None and all(st.get(k) == v for k, v in key.items())


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(root: Path) -> None:
    """Remove leftovers of killed builds (``<root>.tmp-<pid>`` / ``<root>.old-<pid>`` with dead pid)."""
    for p in root.parent.glob(f"{root.name}.*-*"):
        kind, _, pid = p.name[len(root.name) + 1 :].partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and (int(pid) == os.getpid() or not _pid_alive(int(pid))):
            shutil.rmtree(p, ignore_errors=True)


def _build_into(tmp_root: Path, seed: int, s: Dict[str, Any], log) -> Dict[str, Any]:
    import torch

    # single thread: bit-identical results whatever the core count, and robust to CPU contention
    # (2 OpenMP threads on a busy 2-core box are several times slower than one)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build_steps(tmp_root, seed, s, log)
    finally:
        torch.set_num_threads(prev_threads)


def _build_steps(tmp_root: Path, seed: int, s: Dict[str, Any], log) -> Dict[str, Any]:
    import random

    import numpy as np
    import torch

    from . import tiny_data as D
    from . import tiny_models as M

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    paths = TinyAssets.at(tmp_root)
    metrics: Dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    t = time.time()
    gen = D.generate_data(
        paths.data_root, seed, s["n_train"], s["n_heldout"], s["n_instruct"], s["text_only_frac"]
    )
    n_text = sum("image" not in r for r in gen.instruct_records)
    log(
        f"[tiny] data: {len(gen.train_records)} train / {len(gen.heldout_records)} held-out records, "
        f"{len(gen.instruct_records)} instruction records ({n_text} text-only) ({time.time() - t:.1f}s)"
    )
    metrics.update(
        n_train=len(gen.train_records),
        n_heldout=len(gen.heldout_records),
        n_instruct=len(gen.instruct_records),
        n_instruct_text_only=n_text,
        n_train_distinct_captions=len({r["conversations"][1]["value"] for r in gen.train_records}),
    )

    t = time.time()
    tok = M.train_tokenizer(D.tokenizer_corpus(gen), paths.llm_dir, s["vocab_size"], log=lambda m: log("[tiny] " + m))
    metrics["vocab_size"] = len(tok)
    log(f"[tiny] tokenizer done ({time.time() - t:.1f}s)")

    t = time.time()
    log(f"[tiny] llm: LlamaForCausalLM h64 x2 layers, {s['lm_steps']} steps x {s['lm_batch_size']}")
    metrics.update(
        M.pretrain_llm(
            tok, D.lm_corpus(gen), paths.llm_dir, seed, s["lm_steps"], s["lm_batch_size"], s["lm_lr"], log=log
        )
    )
    log(f"[tiny] llm done: final LM loss {metrics['lm_final_loss']:.3f} ({time.time() - t:.1f}s)")

    t = time.time()
    log(f"[tiny] vision: CLIPVisionModel 64px/16 h64 x3 layers, {s['vision_steps']} steps x {s['vision_batch_size']}")
    targets = [D.vision_targets(sc) for sc in gen.train_scenes]
    metrics.update(
        M.pretrain_vision(
            gen.train_jpegs,
            targets,
            paths.vision_dir,
            seed,
            (1 + len(D.COLOR_NAMES), 1 + len(D.SHAPES), 1 + len(D.SIZES)),
            s["vision_steps"],
            s["vision_batch_size"],
            s["vision_lr"],
            log=log,
        )
    )
    metrics.update(M.check_vision_fp16(paths.vision_dir, gen.train_jpegs[:8]))
    log(
        f"[tiny] vision done: loss {metrics['vision_final_loss']:.3f}, quadrant acc "
        f"{metrics['vision_final_quadrant_acc']:.3f}, fp16 forward ok ({time.time() - t:.1f}s)"
    )
    return metrics


def build_tiny_assets(
    root: Union[str, Path] = "playground/tiny",
    seed: int = 0,
    force: bool = False,
    verbose: bool = False,
    **overrides: Any,
) -> TinyAssets:
    """Build (or reuse) the tiny offline assets under ``root``; see module docstring.

    Size knobs (keyword overrides, defaults in ``DEFAULT_SETTINGS``): n_train, n_heldout,
    n_instruct, text_only_frac, vocab_size, lm_steps, lm_batch_size, lm_lr, vision_steps,
    vision_batch_size, vision_lr. They are part of the cache key.
    """
    unknown = set(overrides) - set(DEFAULT_SETTINGS)
    if unknown:
        raise TypeError(f"unknown settings: {sorted(unknown)}")
    settings = {**DEFAULT_SETTINGS, **overrides}
    root = Path(root).absolute()
    paths = TinyAssets.at(root)
    key = _stamp_key(seed, settings)
    if not force and _stamp_matches(root, key):
        return paths

    def log(msg: str) -> None:
        if verbose:
            print(msg, flush=True)

    # lock file outside the tree (keeps the repo clean); one per absolute root path
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:16]
    lock = Path(tempfile.gettempdir()) / f"llava_contrastive_tiny_{digest}.lock"
    with _file_lock(lock):
        if not force and _stamp_matches(root, key):  # another process built it while we waited
            log(f"[tiny] {root} was built by another process")
            return paths
        _clean_stale(root)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        tmp_root = root.parent / f"{root.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp_root, ignore_errors=True)
        tmp_root.mkdir(parents=True)
        t0 = time.time()
        log(f"[tiny] building into {tmp_root} (seed {seed})")
        try:
            metrics = _build_into(tmp_root, seed, settings, log)
            metrics["build_seconds"] = round(time.time() - t0, 1)
            _write_json_atomic(tmp_root / STAMP_NAME, {**key, "metrics": metrics})  # last file written
            old = root.parent / f"{root.name}.old-{os.getpid()}"
            if root.exists():
                os.replace(root, old)
            os.replace(tmp_root, root)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp_root, ignore_errors=True)
            raise
        log(f"[tiny] built {root} in {time.time() - t0:.1f}s")
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llava_contrastive.tiny", description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="playground/tiny", help="output directory (default: playground/tiny)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild even if STAMP.json matches")
    args = ap.parse_args(argv)
    t0 = time.time()
    hit = not args.force and _stamp_matches(Path(args.root).absolute(), _stamp_key(args.seed, dict(DEFAULT_SETTINGS)))
    paths = build_tiny_assets(args.root, seed=args.seed, force=args.force, verbose=True)
    dt = time.time() - t0
    st = read_stamp(paths.root) or {}
    print(f"[tiny] ready in {dt:.2f}s ({'cache hit: ' + str(paths.root / STAMP_NAME) if hit else 'built'})")
    for k, v in asdict(paths).items():
        print(f"  {k:22s} {v}")
    m = st.get("metrics", {})
    if m:
        print("  metrics: " + ", ".join(f"{k}={v}" for k, v in sorted(m.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
