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

Everything read back is loaded with ``weights_only=True`` or safetensors.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from typing import Dict, List, Mapping, Optional

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger("llava_contrastive")

PROJECTOR_FILE = "mm_projector.bin"
HEAD_FILE = "contrastive_head.safetensors"
HEAD_CONFIG_FILE = "contrastive_config.json"
TRAINER_STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
CHECKPOINT_PREFIX = "checkpoint"  # transformers' PREFIX_CHECKPOINT_DIR
STAGING_PREFIX = "tmp-"  # tmp-checkpoint-N: never matched by transformers' checkpoint-N patterns
HEAD_SHAPE_KEYS = ("contrastive_loss", "contrastive_head", "contrastive_head_dim", "contrastive_queue_size")
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")


# ---- single files ------------------------------------------------------------------------------
def atomic_torch_save(obj, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(text: str, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load_projector_state(path: str) -> Dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"{path}: not a readable projector file ({err})") from err


def save_head(state: Mapping[str, torch.Tensor], contrastive_args: dict, directory: str) -> None:
    """``contrastive_head.safetensors`` (keys relative to the head, e.g. ``scale.log_scale``) and
    ``contrastive_config.json`` (the ContrastiveArguments), each written atomically."""
    tmp = os.path.join(directory, f"{HEAD_FILE}.tmp-{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp)
    os.replace(tmp, os.path.join(directory, HEAD_FILE))
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


# ---- checkpoint directories ----------------------------------------------------------------------
def checkpoint_step(name: str) -> Optional[int]:
    """N for a directory named ``checkpoint-N``, else None."""
    match = _CHECKPOINT_RE.match(os.path.basename(os.path.normpath(name)))
    return int(match.group(1)) if match else None


def is_complete_checkpoint(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, TRAINER_STATE_FILE))


def _checkpoints(output_dir: str) -> List[str]:
    if not os.path.isdir(output_dir):
        return []
    found = [(checkpoint_step(n), os.path.join(output_dir, n)) for n in os.listdir(output_dir)]
    return [p for s, p in sorted((s, p) for s, p in found if s is not None and os.path.isdir(p))]


def last_complete_checkpoint(output_dir: str) -> Optional[str]:
    """The highest-numbered complete ``checkpoint-N`` in ``output_dir`` (None if there is none)."""
    complete = [p for p in _checkpoints(output_dir) if is_complete_checkpoint(p)]
    return complete[-1] if complete else None


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
        stale = name.startswith(STAGING_PREFIX + CHECKPOINT_PREFIX + "-") or (
            checkpoint_step(name) is not None and not is_complete_checkpoint(path))
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
           "commit_staged"]
