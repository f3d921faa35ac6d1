"""Stage-1 files and resumable checkpoints for the transformers-native host.

A stage-1 directory (the final output, and every ``checkpoint-N``) holds only what trains:
``mm_projector.bin`` in upstream's keys (``model.mm_projector.{0,2}.*``, a drop-in for upstream
stage 2 ``--pretrain_mm_mlp_adapter``) and the contrastive head in the core format shared with the
upstream host (``contrastive_head.safetensors`` + ``contrastive_config.json``). The frozen LLM and
vision tower are never written into checkpoints; under DeepSpeed the engine checkpoint excludes them
(``exclude_frozen_parameters``) and is loaded back non-strictly.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch

from llava_contrastive.training.checkpointing import PROJECTOR_FILE, atomic_torch_save, load_head, load_projector_state, save_head
from llava_contrastive.hosts.hf import convert


def is_zero3() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return bool(is_deepspeed_zero3_enabled())


def gathered_state(module, zero3: Optional[bool] = None) -> Dict[str, torch.Tensor]:
    """CPU copy of ``module.state_dict()``, its parameters gathered first under ZeRO-3 (collective:
    every rank must call it)."""
    zero3 = is_zero3() if zero3 is None else zero3
    params = list(module.parameters())
    if zero3 and any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def save_stage1_files(model, output_dir: str, is_main: bool, zero3: Optional[bool] = None) -> None:
    """``mm_projector.bin`` (upstream keys) and, with the contrastive term on, the head files.
    Collective under ZeRO-3; only ``is_main`` writes. Each file is replaced atomically."""
    projector = gathered_state(model.model.multi_modal_projector, zero3)
    head = gathered_state(model.contrastive_head, zero3) if getattr(model, "contrastive_head", None) is not None \
        else None
    if not is_main:
        return
    os.makedirs(output_dir, exist_ok=True)
    native = {convert.NATIVE_PREFIX + k: v for k, v in projector.items()}
    atomic_torch_save(convert.native_to_upstream(native, projector_type=convert.native_projector_type(model.config)),
                      os.path.join(output_dir, PROJECTOR_FILE))
    if head is not None:
        save_head(head, model.contrastive_args.to_dict(), output_dir)


def load_stage1_weights(model, directory: str) -> None:
    """Projector (strict, names and shapes checked) and head from a stage-1 directory into ``model``
    (not under ZeRO-3: there the DeepSpeed engine checkpoint restores them)."""
    path = os.path.join(directory, PROJECTOR_FILE)
    state = load_projector_state(path)
    try:
        convert.load_projector(model, state)
    except (RuntimeError, KeyError, ValueError) as err:
        raise ValueError(f"{path}: does not fit this model's projector ({err})") from err
    if getattr(model, "contrastive_head", None) is not None:
        load_head(model, directory)
