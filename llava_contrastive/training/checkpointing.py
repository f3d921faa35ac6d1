"""Host-agnostic stage-1 checkpoint helpers, shared by both hosts (no ``llava`` and no
``transformers`` import).

* the file names of a stage-1 output / checkpoint directory: ``mm_projector.bin`` (upstream keys),
  ``contrastive_head.safetensors`` + ``contrastive_config.json`` (the learnable logit scale / bias /
  linear heads / queue, and the settings that fix their shapes), so a head written by one host
  loads in the other
* atomic single-file writes (temporary file + ``os.replace``)
* staged checkpoint directories: a checkpoint is written into ``tmp-checkpoint-N`` and renamed to
  ``checkpoint-N`` once complete, so a killed save never leaves a ``checkpoint-N`` that looks
  complete; ``clean_incomplete_checkpoints`` removes what a killed save left behind and
  ``last_complete_checkpoint`` picks the checkpoint to resume from.
* manifests: ``manifest.json`` (relative path, size and sha256 of every file of a checkpoint,
  DeepSpeed ``global_step*/`` shards included) is written last; ``verify_checkpoint`` compares a
  checkpoint with it, so a truncated, missing or altered file is found before a resume, and
  ``last_complete_checkpoint`` falls back to the newest checkpoint that verifies.
* a failed save (a full disk, a failing write) becomes ``CheckpointSaveError`` naming the path,
  the free space and the space needed (``save_failure_message``).

Everything read back is loaded with ``weights_only=True`` or safetensors.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file

from llava_contrastive.core.files import atomic_write, atomic_write_json, atomic_write_text

logger = logging.getLogger("llava_contrastive")

PROJECTOR_FILE = "mm_projector.bin"
HEAD_FILE = "contrastive_head.safetensors"
HEAD_CONFIG_FILE = "contrastive_config.json"
TRAINER_STATE_FILE = "trainer_state.json"  # its presence marks a complete checkpoint (legacy: no manifest)
MANIFEST_FILE = "manifest.json"  # written after everything else: sizes and sha256 of every file
MANIFEST_VERSION = 1
CHECKPOINT_PREFIX = "checkpoint"  # transformers' PREFIX_CHECKPOINT_DIR
STAGING_PREFIX = "tmp-"  # tmp-checkpoint-N: never matched by transformers' checkpoint-N patterns
HEAD_SHAPE_KEYS = ("contrastive_loss", "contrastive_head", "contrastive_head_dim", "contrastive_queue_size")
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")


# ---- single files ------------------------------------------------------------------------------
def atomic_torch_save(obj, path: str) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_projector_state(path: str) -> Dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"{path}: not a readable projector file ({err})") from err


def save_head(state: Mapping[str, torch.Tensor], contrastive_args: dict, directory: str) -> None:
    """``contrastive_head.safetensors`` (keys relative to the head, e.g. ``scale.log_scale``) and
    ``contrastive_config.json`` (the ContrastiveArguments), each written atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write(os.path.join(directory, HEAD_FILE), lambda tmp: save_file(tensors, tmp))
    atomic_write_text(json.dumps(contrastive_args, indent=2, sort_keys=True), os.path.join(directory, HEAD_CONFIG_FILE))


def load_head(model, directory: str, for_evaluation: bool = False) -> None:
    """Restore ``model.contrastive_head`` from ``directory``, refusing a head saved under settings
    that change its shapes (loss, linear head, head dim, queue size). ``for_evaluation``: the text
    queue (a training-only buffer) is neither compared nor loaded."""
    path = os.path.join(directory, HEAD_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: contrastive head missing (the run has --contrastive_weight > 0)")
    cfg_path = os.path.join(directory, HEAD_CONFIG_FILE)
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            saved = json.load(f)
        current = model.contrastive_args.to_dict()
        keys = [k for k in HEAD_SHAPE_KEYS if not (for_evaluation and k == "contrastive_queue_size")]
        diff = {k: (saved.get(k), current[k]) for k in keys if saved.get(k) != current[k]}
        if diff:
            raise ValueError(f"{path}: contrastive head from another configuration: "
                             + ", ".join(f"--{k} saved {a!r} vs now {b!r}" for k, (a, b) in diff.items()))
    state = load_file(path)
    if for_evaluation:
        state = {k: v for k, v in state.items() if not k.startswith("queue.")}
    head = model.contrastive_head
    own = dict(head.state_dict())
    if set(own) != set(state):
        raise ValueError(f"{path}: keys {sorted(state)} do not match the head's {sorted(own)}")
    for k, v in state.items():
        if own[k].numel() != 0 and tuple(own[k].shape) != tuple(v.shape):
            raise ValueError(f"{path}: {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
    head.load_state_dict(state, strict=True)


def load_head_buffers(model, directory: str) -> int:
    """Only the buffers (the text queue) of ``model.contrastive_head`` from ``directory``'s head file;
    its parameters come from elsewhere (e.g. a world-size-independent optimizer state). Returns how
    many buffers were loaded."""
    head = getattr(model, "contrastive_head", None)
    buffers = dict(head.named_buffers()) if head is not None else {}
    if not buffers:
        return 0
    state = load_file(os.path.join(directory, HEAD_FILE))
    with torch.no_grad():
        for name, buf in buffers.items():
            buf.copy_(state[name])
    return len(buffers)


# ---- checkpoint directories ----------------------------------------------------------------------
def checkpoint_step(name: str) -> Optional[int]:
    """N for a directory named ``checkpoint-N``, else None."""
    match = _CHECKPOINT_RE.match(os.path.basename(os.path.normpath(name)))
    return int(match.group(1)) if match else None


def is_complete_checkpoint(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, TRAINER_STATE_FILE))


def checkpoint_dirs(output_dir: str) -> List[str]:
    """The ``checkpoint-N`` directories of ``output_dir``, in step order."""
    if not os.path.isdir(output_dir):
        return []
    found = [(checkpoint_step(n), os.path.join(output_dir, n)) for n in os.listdir(output_dir)]
    return [p for s, p in sorted((s, p) for s, p in found if s is not None and os.path.isdir(p))]


def last_complete_checkpoint(output_dir: str) -> Optional[str]:
    """The newest verified ``checkpoint-N`` in ``output_dir`` (None if there is none): the newest is
    checked against its manifest; a damaged one is reported (warning naming it and the reason) and
    the previous one is tried."""
    for path in reversed(checkpoint_dirs(output_dir)):
        reason = verify_checkpoint(path)
        if reason is None:
            return path
        logger.warning("checkpoint %s is damaged (%s): falling back to the previous checkpoint", path, reason)
    return None


def staging_dir(final_dir: str) -> str:
    parent, name = os.path.split(os.path.normpath(final_dir))
    return os.path.join(parent, STAGING_PREFIX + name)


def clean_incomplete_checkpoints(output_dir: str) -> List[str]:
    """Remove what interrupted saves left in ``output_dir``: staging directories (``tmp-checkpoint-*``)
    and ``checkpoint-N`` directories without their trainer state (written by a save that was not
    staged). Returns the removed paths. Call on one process per file system, before any rank
    resumes."""
    removed = []
    if not os.path.isdir(output_dir):
        return removed
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        # a checkpoint-N with a manifest was complete once: if it lost files it is damaged, kept for
        # inspection (last_complete_checkpoint reports it and skips it), not removed here
        stale = name.startswith(STAGING_PREFIX + CHECKPOINT_PREFIX + "-") or (
            checkpoint_step(name) is not None and not is_complete_checkpoint(path)
            and not os.path.isfile(os.path.join(path, MANIFEST_FILE)))
        if stale and os.path.isdir(path):
            logger.warning("removing incomplete checkpoint %s (a save was interrupted)", path)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def commit_staged(staging: str, final_dir: str) -> None:
    """Publish a fully written staging directory as ``final_dir`` (one rename). An existing
    ``final_dir`` (a checkpoint of the same step from an earlier run) is moved aside first and
    removed afterwards; a crash in between leaves only ``tmp-*`` directories, which
    ``clean_incomplete_checkpoints`` removes."""
    old = None
    if os.path.exists(final_dir):
        old = staging_dir(final_dir) + f".old-{os.getpid()}"
        os.replace(final_dir, old)
    os.replace(staging, final_dir)
    _fsync_dir(os.path.dirname(os.path.normpath(final_dir)) or ".")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- manifests: sizes and checksums, written last ------------------------------------------------
def file_sha256(path: str, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_files(directory: str) -> List[str]:
    """Every regular file under ``directory`` (recursively), as sorted '/'-separated relative paths,
    except the manifest itself."""
    found = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory).replace(os.sep, "/")
            if rel != MANIFEST_FILE and os.path.isfile(path) and not os.path.islink(path):
                found.append(rel)
    return sorted(found)


def build_manifest(directory: str) -> Dict:
    """``{"version": 1, "files": {relative path: {"size": bytes, "sha256": hex}}}`` of ``directory``."""
    files = {}
    for rel in checkpoint_files(directory):
        path = os.path.join(directory, *rel.split("/"))
        files[rel] = {"size": os.path.getsize(path), "sha256": file_sha256(path)}
    return {"version": MANIFEST_VERSION, "files": files}


def write_manifest(directory: str) -> Dict:
    """Write ``directory/manifest.json`` atomically, after every other file of the checkpoint is in
    place (call it last, on one process, once all ranks wrote their part). Returns the manifest."""
    manifest = build_manifest(directory)
    atomic_write_json(os.path.join(directory, MANIFEST_FILE), manifest, indent=1, sort_keys=True)
    _fsync_dir(directory)
    return manifest


def verify_checkpoint(directory: str) -> Optional[str]:
    """None when ``directory`` is an intact checkpoint, else the reason it is not: a file of the
    manifest is missing, has another size (truncated) or another sha256. A checkpoint without a
    manifest but with ``trainer_state.json`` (saved before manifests existed) counts as complete."""
    if not os.path.isdir(directory):
        return "not a directory"
    manifest_path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.isfile(manifest_path):
        if is_complete_checkpoint(directory):
            logger.info("%s: no %s (saved before manifests existed): trusted as complete because %s is present",
                        directory, MANIFEST_FILE, TRAINER_STATE_FILE)
            return None
        return f"incomplete: neither {MANIFEST_FILE} nor {TRAINER_STATE_FILE} (an interrupted save)"
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        files = manifest["files"]
        entries = [(str(rel), int(e["size"]), str(e["sha256"])) for rel, e in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{MANIFEST_FILE} unreadable ({type(err).__name__}: {err})"
    paths = {}
    for rel, size, _ in entries:  # sizes first (cheap), checksums after
        parts = rel.split("/")
        if not rel or rel.startswith("/") or ".." in parts:
            return f"{MANIFEST_FILE} lists {rel!r}, a path outside the checkpoint"
        path = paths[rel] = os.path.join(directory, *parts)
        if not os.path.isfile(path):
            return f"missing file {rel}"
        actual = os.path.getsize(path)
        if actual != size:
            what = "truncated" if actual < size else "size differs"
            return f"{what}: {rel} is {actual} bytes, the manifest says {size}"
    for rel, _, digest in entries:
        if file_sha256(paths[rel]) != digest:
            return f"checksum mismatch: {rel} (sha256 differs from the manifest)"
    return None


def rotation_victims(checkpoints: Sequence[str], save_total_limit: Optional[int],
                     protected: Iterable[Optional[str]] = ()) -> List[str]:
    """What ``save_total_limit`` rotation deletes from ``checkpoints`` (oldest first): the oldest ones
    beyond the limit, never the newest and never a protected one (the last verified checkpoint, the
    best model checkpoint). Pure: deletes nothing."""
    if not save_total_limit or save_total_limit <= 0 or not checkpoints:
        return []
    norm = [os.path.normpath(p) for p in checkpoints]
    keep = {os.path.normpath(p) for p in protected if p} & set(norm)
    keep.add(norm[-1])
    excess = len(norm) - max(int(save_total_limit), len(keep))
    victims = []
    for original, path in zip(checkpoints, norm):
        if excess <= 0:
            break
        if path not in keep:
            victims.append(original)
            excess -= 1
    return victims


# ---- failed saves ----------------------------------------------------------------------------------
class CheckpointSaveError(RuntimeError):
    """A checkpoint save failed (full disk, failing write); the message names the path, the free and
    the needed space, and what is left to resume from."""

    def __init__(self, message: str, path: str = "", needed: int = 0, free: Optional[int] = None):
        super().__init__(message)
        self.path, self.needed, self.free = path, needed, free


def dir_bytes(path: str) -> int:
    """Total size of the regular files under ``path`` (0 if it does not exist)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def free_bytes(path: str) -> Optional[int]:
    """Free space of the file system holding ``path`` (its nearest existing parent); None if unknown."""
    path = os.path.abspath(path)
    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _mb(n: Optional[int]) -> str:
    return "unknown" if n is None else f"{n / 2 ** 20:.1f} MB"


def save_failure_message(err: OSError, checkpoint: str, *, needed: int, needed_from: str, free: Optional[int],
                         previous: Optional[str]) -> str:
    """The message of a failed checkpoint save: what failed where, free vs needed space, what is left."""
    full = err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    what = "the disk is full" if full else "a write failed"
    target = err.filename or checkpoint
    left = (f"the previous checkpoint {previous} is intact: rerunning the same command resumes from it"
            if previous else "there is no earlier checkpoint: a rerun starts from step 0")
    return (f"saving {checkpoint} failed, {what}: {err.strerror or err} ({target}). Free space on "
            f"{os.path.dirname(os.path.abspath(checkpoint))}: {_mb(free)}; a checkpoint needs about {_mb(needed)} "
            f"({needed_from}). The incomplete save was removed and {left}. Fix: free space or point --output_dir "
            f"at a larger disk (and check --save_total_limit), then rerun.")


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = ["PROJECTOR_FILE", "HEAD_FILE", "HEAD_CONFIG_FILE", "TRAINER_STATE_FILE", "atomic_torch_save",
           "atomic_write_text", "load_projector_state", "save_head", "load_head", "checkpoint_step",
           "is_complete_checkpoint", "last_complete_checkpoint", "staging_dir", "clean_incomplete_checkpoints",
           "commit_staged", "checkpoint_dirs", "MANIFEST_FILE", "write_manifest", "build_manifest",
           "verify_checkpoint", "rotation_victims", "CheckpointSaveError", "save_failure_message", "dir_bytes",
           "free_bytes"]
