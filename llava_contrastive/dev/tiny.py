"""Tiny offline assets for LLaVA stage-1 tests: ``python -m llava_contrastive.tiny``.

Builds, deterministically from a seed and in about a minute on 2 CPU cores (``--tier small``:
LLM 256 x 4 and a 4-layer tower, a few minutes, default root ``playground/tiny-small``):

    <root>/
      STAMP.json                               seed, format version, settings, metrics (written last)
      models/vicuna-tiny/                      LlamaForCausalLM + slow LlamaTokenizer (SentencePiece)
      models/clip-vit-tiny/                    CLIPVisionModel (64px, patch 16) + CLIPImageProcessor
      data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json   stage-1 train records (upstream format)
      data/LLaVA-Pretrain/heldout.json                  held-out records (captions unseen in train)
      data/LLaVA-Pretrain/images/NNNNN/NNNNNNNNN.jpg
      data/llava_v1_5_mix665k.json                      stage-2 instruction mix (multi-turn + text-only)
      data/coco/train2017/NNNNNNNNNNNN.jpg
      data/llava_v1_5_mix_large.json                    larger stage-2 mix teaching the benchmark answer formats
      data/eval/{pope,mme,mmbench,gqa,textqa}/          benchmark suite (evaluation/benchmarks.py), unseen scenes

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

from llava_contrastive.core.files import atomic_write_json

FORMAT_VERSION = 6  # bump whenever generated content changes (3: benchmarks + large stage-2 mix; 4-5: v1 tokenizer corpus without newline pieces, 512 positions; 6: colour-led stage-2 mix, GQA phrasings)
STAMP_NAME = "STAMP.json"

DEFAULT_SETTINGS: Dict[str, Any] = {
    "n_train": 8000,
    "n_heldout": 1200,
    "n_instruct": 400,
    "text_only_frac": 0.1,
    "n_instruct_large": 12000,  # stage-2 large mix (data/llava_v1_5_mix_large.json), 2 records per image
    "bench_questions": 1000,  # model queries per benchmark and split (data/eval/)
    "vocab_size": 512,
    "lm_steps": 500,
    "lm_batch_size": 32,
    "lm_lr": 3e-3,
    "vision_steps": 700,
    "vision_batch_size": 64,
    "vision_lr": 4e-3,  # per-token head (issue 13): 2e-3 left held-out per-token shape at 0.79, 4e-3 0.84-0.86
}

# Asset tiers (issue 13, part 6): model shapes (``TIER_SHAPES``), training knobs that differ from
# DEFAULT_SETTINGS, and the default root. Data (scenes, instruction mixes, benchmarks) is the same for
# every tier and seed. The tier and its shapes are part of the STAMP, so caches of two tiers never mix.
DEFAULT_TIER = "tiny"
TIER_SHAPES: Dict[str, Dict[str, Dict[str, int]]] = {
    "tiny": {  # LLM 166k parameters, tower 151k; 16 image tokens
        "llm": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4),
        "vision": dict(image_size=64, patch_size=16, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=3, num_attention_heads=4),
    },
    "small": {  # LLM 3.4M parameters, tower 0.45M; 16 image tokens. A 96 px / 36-token tower learned
        # per-token shape far worse in the same budget (0.39 vs 0.89 held-out), and 128 wide was no better than 96.
        "llm": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4),
        "vision": dict(image_size=64, patch_size=16, hidden_size=96, intermediate_size=192,
                       num_hidden_layers=4, num_attention_heads=4),
    },
}
TIER_SETTINGS: Dict[str, Dict[str, Any]] = {
    "tiny": {},
    "small": {"lm_steps": 400, "lm_lr": 2e-3, "vision_steps": 700},
}
TIER_ROOTS: Dict[str, str] = {"tiny": "playground/tiny", "small": "playground/tiny-small"}


def tier_shapes(tier: str = DEFAULT_TIER) -> Dict[str, Dict[str, int]]:
    """Copy of ``TIER_SHAPES[tier]`` (``llm`` and ``vision`` config fields)."""
    if tier not in TIER_SHAPES:
        raise ValueError(f"unknown asset tier {tier!r}: choose one of {sorted(TIER_SHAPES)} (--tier)")
    return {k: dict(v) for k, v in TIER_SHAPES[tier].items()}


def tier_settings(tier: str = DEFAULT_TIER, **overrides: Any) -> Dict[str, Any]:
    """The full settings (cache key) of ``tier``: DEFAULT_SETTINGS, the tier's knobs, ``overrides``,
    then ``tier`` and its model shapes (``llm_shape``, ``vision_shape``)."""
    shapes = tier_shapes(tier)
    unknown = set(overrides) - set(DEFAULT_SETTINGS)
    if unknown:
        raise TypeError(f"unknown settings: {sorted(unknown)}")
    return {**DEFAULT_SETTINGS, **TIER_SETTINGS[tier], **overrides, "tier": tier,
            "llm_shape": shapes["llm"], "vision_shape": shapes["vision"]}


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
    instruct_large_json: Path
    eval_root: Path

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
            instruct_large_json=data / "llava_v1_5_mix_large.json",
            eval_root=data / "eval",
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
    atomic_write_json(str(path), obj, indent=2, sort_keys=True)


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


@contextlib.contextmanager
def _one_thread():
    """Build on a single torch thread: bit-identical results whatever the core count, and robust to
    CPU contention (2 OpenMP threads on a busy 2-core box are several times slower than one)."""
    import torch

    prev_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev_threads)


def _build_into(tmp_root: Path, seed: int, s: Dict[str, Any], log) -> Dict[str, Any]:
    with _one_thread():
        return _build_steps(tmp_root, seed, s, log)


def _build_vision(paths: "TinyAssets", seed: int, s: Dict[str, Any], gen, log, tower: str = "clip",
                  out: Optional[Path] = None) -> Dict[str, Any]:
    """Pretrain the tiny vision tower (CLIP, or SigLIP into ``out``) on the scenes' per-quadrant
    attributes (see tiny_models.pretrain_vision)."""
    from llava_contrastive.dev import tiny_data as D
    from llava_contrastive.dev import tiny_models as M

    vs = s["vision_shape"]
    log(f"[tiny] vision ({s['tier']} tier): {M.vision_model_class(tower).__name__} {vs['image_size']}px/"
        f"{vs['patch_size']} h{vs['hidden_size']} x{vs['num_hidden_layers']} layers, {s['vision_steps']} steps x "
        f"{s['vision_batch_size']}")
    targets = [D.vision_targets(sc) for sc in gen.train_scenes]
    held_scenes = _unseen_scenes(seed, 500, gen.signatures)
    heldout = ([D.jpeg_bytes(D.render_scene(sc)) for sc in held_scenes], [D.vision_targets(sc) for sc in held_scenes])
    n_classes = (1 + len(D.COLOR_NAMES), 1 + len(D.SHAPES), 1 + len(D.SIZES))
    return M.pretrain_vision(gen.train_jpegs, targets, out or paths.vision_dir, seed, n_classes, s["vision_steps"],
                             s["vision_batch_size"], s["vision_lr"], log=log, shape=vs, heldout=heldout, tower=tower)


def _build_steps(tmp_root: Path, seed: int, s: Dict[str, Any], log) -> Dict[str, Any]:
    import random

    import numpy as np
    import torch

    from llava_contrastive.dev import tiny_data as D
    from llava_contrastive.dev import tiny_models as M

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
    metrics.update(_build_eval_data(paths, seed, s, gen.signatures, log))

    t = time.time()
    large_mix = json.loads(paths.instruct_large_json.read_text()) if paths.instruct_large_json.is_file() else []
    tok = M.train_tokenizer(D.tokenizer_corpus(gen, large_mix), paths.llm_dir, s["vocab_size"],
                            log=lambda m: log("[tiny] " + m))
    metrics["vocab_size"] = len(tok)
    log(f"[tiny] tokenizer done ({time.time() - t:.1f}s)")

    t = time.time()
    ls = s["llm_shape"]
    log(f"[tiny] llm ({s['tier']} tier): LlamaForCausalLM h{ls['hidden_size']} x{ls['num_hidden_layers']} layers, "
        f"{s['lm_steps']} steps x {s['lm_batch_size']}")
    held_texts = D.caption_texts(gen.heldout_records)  # captions unseen in training
    metrics.update(
        M.pretrain_llm(
            tok, D.lm_corpus(gen), paths.llm_dir, seed, s["lm_steps"], s["lm_batch_size"], s["lm_lr"], log=log,
            shape=ls, heldout_texts=held_texts,
        )
    )
    log(f"[tiny] llm done: {metrics['lm_params']} parameters, final LM loss {metrics['lm_final_loss']:.3f}, "
        f"held-out caption loss {metrics.get('lm_heldout_loss', float('nan')):.3f} ({time.time() - t:.1f}s)")

    metrics.update(_build_vision(paths, seed, s, gen, log))
    metrics.update(M.check_vision_fp16(paths.vision_dir, gen.train_jpegs[:8]))
    log(
        f"[tiny] vision done: {metrics['vision_params']} parameters, loss {metrics['vision_final_loss']:.3f}; "
        "held-out per-token accuracy (penultimate layer) "
        + ", ".join(f"{k} {metrics['vision_heldout_' + k]:.3f}" for k in ("colour", "shape", "size", "presence"))
        + f"; fp16 forward ok ({time.time() - t:.1f}s)"
    )
    return metrics


def _unseen_scenes(seed: int, n: int, seen: set) -> list:
    """``n`` scenes whose composition no stage-1/stage-2 record uses (held-out tower accuracy)."""
    import random

    from llava_contrastive.dev import tiny_data as D

    rng = random.Random(f"tiny-vision-heldout-{seed}")
    out: list = []
    while len(out) < n:
        sc = D.sample_scene(rng)
        if sc.signature not in seen:
            out.append(sc)
    return out


def _build_eval_data(paths: "TinyAssets", seed: int, s: Dict[str, Any], seen: set, log) -> Dict[str, Any]:
    """Large stage-2 mix + the benchmark suite (on scenes stage 1 and stage 2 never use)."""
    from llava_contrastive.dev import tiny_data as D
    from llava_contrastive.evaluation import benchmarks as B

    t = time.time()
    large, large_sigs = D.generate_large_mix(paths.data_root, seed, s["n_instruct_large"], json_name=paths.instruct_large_json.name)
    n_text = sum("image" not in r for r in large)
    log(f"[tiny] large stage-2 mix: {len(large)} records ({n_text} text-only) ({time.time() - t:.1f}s)")
    t = time.time()
    stats = B.build_benchmarks(paths.eval_root, seed, s["bench_questions"], seen | large_sigs)
    log("[tiny] benchmarks: " + ", ".join(f"{b} {v['test']['questions']}" for b, v in stats.items())
        + f" questions per split ({time.time() - t:.1f}s)")
    return {"n_instruct_large": len(large), "n_instruct_large_text_only": n_text,
            "bench_questions_test": {b: v["test"]["questions"] for b, v in stats.items()}}


def build_tiny_assets(
    root: Optional[Union[str, Path]] = None,
    seed: int = 0,
    force: bool = False,
    verbose: bool = False,
    tier: str = DEFAULT_TIER,
    **overrides: Any,
) -> TinyAssets:
    """Build (or reuse) the tiny offline assets under ``root``; see module docstring.

    ``tier`` ("tiny" default, "small") picks the model shapes (``TIER_SHAPES``) and training knobs
    (``TIER_SETTINGS``); ``root`` defaults to ``TIER_ROOTS[tier]``. Tier and shapes are in the STAMP.

    Size knobs (keyword overrides, defaults in ``DEFAULT_SETTINGS``): n_train, n_heldout,
    n_instruct, text_only_frac, n_instruct_large, bench_questions, vocab_size, lm_steps, lm_batch_size, lm_lr, vision_steps,
    vision_batch_size, vision_lr. They are part of the cache key.
    """
    settings = tier_settings(tier, **overrides)
    root = Path(TIER_ROOTS[tier] if root is None else root).absolute()
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


def _cached_part(out: Path, key: Dict[str, Any], build, force: bool = False) -> Path:
    """``out`` if its STAMP.json matches ``key``; else ``build(tmp)`` (returns metrics) into a temporary
    sibling, stamped and swapped in whole, so a killed build never leaves a half-written ``out``."""
    stamp = out / STAMP_NAME
    if not force and stamp.is_file() and {k: v for k, v in json.loads(stamp.read_text()).items()
                                          if k != "metrics"} == key:
        return out
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        metrics = build(tmp)
        _write_json_atomic(tmp / STAMP_NAME, {**key, "metrics": metrics})
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _base_stamp(assets: TinyAssets) -> Dict[str, Any]:
    base = read_stamp(assets.root)
    if base is None:
        raise FileNotFoundError(f"{assets.root}: no tiny assets (build them first: python -m llava_contrastive.tiny)")
    return base


def family_llm_dir(assets: TinyAssets, family: str) -> Path:
    """The tiny LLM of ``family``: the default Llama (``models/vicuna-tiny``) or ``models/<family>-tiny``."""
    return assets.llm_dir if family == "llama" else assets.root / "models" / f"{family}-tiny"


def build_family_llm(assets: TinyAssets, family: str, seed: int = 0, force: bool = False,
                     verbose: bool = False) -> Path:
    """Build (or reuse) the tiny LLM of ``family`` beside the default assets: the same tokenizer (Qwen2:
    a byte-level BPE one built as Qwen2's, trained on the same corpus, see
    ``tiny_models.train_qwen2_tokenizer``), the same caption-language corpus (read back from the assets' pretrain and instruction JSON), the same
    shape and training knobs as the assets' Llama, pretrained from its own initialisation; cached with
    a STAMP.json of its own (keyed by the assets' stamp, the family and the seed)."""
    from llava_contrastive.dev import tiny_data as D
    from llava_contrastive.dev import tiny_models as M

    if family == "llama":
        return assets.llm_dir
    if family not in M.LLM_FAMILIES:
        raise ValueError(f"unknown LLM family {family!r}: choose one of {', '.join(M.LLM_FAMILIES)}")
    base = _base_stamp(assets)
    out = family_llm_dir(assets, family)
    key = {"family": family, "seed": seed, "assets": {k: base[k] for k in ("format_version", "seed", "settings")}}
    # qwen2: its own byte-level BPE; others: the SentencePiece model plus its tokenizer.json
    key["tokenizer"] = "qwen2 byte-level BPE" if family == "qwen2" else "sentencepiece + tokenizer.json"
    log = print if verbose else (lambda msg: None)
    s = base["settings"]

    def build(tmp: Path) -> Dict[str, Any]:
        from transformers import AutoTokenizer

        texts = D.lm_texts(json.loads(assets.pretrain_json.read_text()), json.loads(assets.instruct_json.read_text()))
        if family == "qwen2":
            tok = M.train_qwen2_tokenizer(texts, tmp, s["vocab_size"], log=log)
        else:
            tok = AutoTokenizer.from_pretrained(str(assets.llm_dir), use_fast=False)
            tok.save_pretrained(str(tmp))
            M.write_fast_tokenizer(assets.llm_dir, tmp, tok, texts[:500])
        held = D.caption_texts(json.loads(assets.heldout_json.read_text()))
        log(f"[tiny] llm ({family}, {s['tier']} tier): {s['lm_steps']} steps x {s['lm_batch_size']} on "
            f"{len(texts)} texts")
        with _one_thread():  # as the default assets
            metrics = M.pretrain_llm(tok, texts, tmp, seed, s["lm_steps"], s["lm_batch_size"], s["lm_lr"], log=log,
                                     shape=s["llm_shape"], heldout_texts=held, family=family)
        log(f"[tiny] {family} LLM: {out} (final LM loss {metrics['lm_final_loss']}, held-out caption loss "
            f"{metrics.get('lm_heldout_loss')})")
        return metrics

    return _cached_part(out, key, build, force)


def family_vision_dir(assets: TinyAssets, tower: str) -> Path:
    """The tiny tower ``tower``: the default CLIP (``models/clip-vit-tiny``) or ``models/<tower>-tiny``."""
    return assets.vision_dir if tower == "clip" else assets.root / "models" / f"{tower}-tiny"


def build_family_vision(assets: TinyAssets, tower: str, seed: int = 0, force: bool = False,
                        verbose: bool = False) -> Path:
    """Build (or reuse) the tiny vision tower ``tower`` (``siglip``) beside the default assets: the same
    shape, scenes (drawn again from the assets' seed), per-patch attribute targets and training knobs
    as the assets' CLIP, its own architecture (no class token) and preprocessing; cached with a
    STAMP.json of its own (keyed by the assets' stamp, the tower and the seed)."""
    from llava_contrastive.dev import tiny_data as D
    from llava_contrastive.dev import tiny_models as M

    if tower == "clip":
        return assets.vision_dir
    M.cls_tokens(tower)  # known tower, or ValueError
    base = _base_stamp(assets)
    out = family_vision_dir(assets, tower)
    key = {"tower": tower, "seed": seed, "assets": {k: base[k] for k in ("format_version", "seed", "settings")}}
    log = print if verbose else (lambda msg: None)
    s = base["settings"]

    def build(tmp: Path) -> Dict[str, Any]:
        scratch = out.parent / f"{out.name}.scenes-{os.getpid()}"
        try:
            with _one_thread():  # as the default assets
                gen = D.generate_data(scratch, base["seed"], s["n_train"], s["n_heldout"], s["n_instruct"],
                                      s["text_only_frac"])
                metrics = _build_vision(assets, seed, s, gen, log, tower=tower, out=tmp)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        log(f"[tiny] {tower} tower: {out} (loss {metrics['vision_final_loss']}, held-out per-token colour "
            f"{metrics.get('vision_heldout_colour')}, shape {metrics.get('vision_heldout_shape')})")
        return metrics

    return _cached_part(out, key, build, force)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llava_contrastive.tiny", description=__doc__.split("\n")[0])
    ap.add_argument("--tier", choices=sorted(TIER_SHAPES), default=DEFAULT_TIER,
                    help="model sizes: tiny (default; LLM 64 x 2, CLIP hidden 64 x 3) or small "
                         "(LLM 256 x 4, CLIP hidden 96 x 4); towers at 64 px, patch 16")
    ap.add_argument("--root", default=None,
                    help="output directory (default: playground/tiny, or playground/tiny-small for --tier small)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild even if STAMP.json matches")
    ap.add_argument("--llm", default="llama", choices=["llama", "mistral", "qwen2"],
                    help="also build the tiny LLM of this family beside the default Llama "
                         "(models/<family>-tiny: same tokenizer, corpus and shape, its own pretraining)")
    ap.add_argument("--vision", default="clip", choices=["clip", "siglip"],
                    help="also build the tiny vision tower of this kind beside the default CLIP "
                         "(models/<tower>-tiny: same shape, scenes and targets, its own pretraining)")
    args = ap.parse_args(argv)
    t0 = time.time()
    root = Path(TIER_ROOTS[args.tier] if args.root is None else args.root).absolute()
    hit = not args.force and _stamp_matches(root, _stamp_key(args.seed, tier_settings(args.tier)))
    paths = build_tiny_assets(root, seed=args.seed, force=args.force, verbose=True, tier=args.tier)
    dt = time.time() - t0
    st = read_stamp(paths.root) or {}
    print(f"[tiny] ready in {dt:.2f}s ({'cache hit: ' + str(paths.root / STAMP_NAME) if hit else 'built'})")
    for k, v in asdict(paths).items():
        print(f"  {k:22s} {v}")
    m = st.get("metrics", {})
    if m:
        print("  metrics: " + ", ".join(f"{k}={v}" for k, v in sorted(m.items())))
    if args.llm != "llama":
        llm = build_family_llm(paths, args.llm, seed=args.seed, force=args.force, verbose=True)
        print(f"  {args.llm + '_llm_dir':22s} {llm}")
    if args.vision != "clip":
        tower = build_family_vision(paths, args.vision, seed=args.seed, force=args.force, verbose=True)
        print(f"  {args.vision + '_vision_dir':22s} {tower}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
