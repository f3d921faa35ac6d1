"""ContrastiveLLaVATrainer: upstream's LLaVATrainer plus the joint-loss bookkeeping of
``hosts/common.py`` (optimizer group, step guard, logs, trainable-only checkpoints).

Only what is upstream-specific lives here: the head is built after upstream froze the model; stage-1
saves write upstream's files and make checkpoints resumable (upstream's hold only mm_projector.bin);
the RNG restore works around transformers 4.37's ``torch.load`` under torch >= 2.6; the vision tower
dtype follows ``--vision_tower_dtype``. Signatures that changed in later transformers releases
(compute_loss, _save_checkpoint, log) accept the extra arguments.
"""
from __future__ import annotations

import logging
import os
import random
from typing import Optional

import numpy as np
import torch
import transformers
from transformers import Trainer

from llava_contrastive.core.config import ContrastiveArguments
from llava_contrastive.core.head import find_contrastive_model
from llava_contrastive.hosts.common import ContrastiveTrainerMixin, normal_init_
from llava_contrastive.hosts.llava import checkpoint as ckpt
from llava_contrastive.hosts.llava.args import check_projector_init
from llava_contrastive.hosts.llava.compat import LLaVATrainer
from llava_contrastive.training.checkpointing import atomic_torch_save

NON_LORA_FILE = "non_lora_trainables.bin"  # upstream's name for this state in a LoRA run's final output

logger = logging.getLogger("llava_contrastive")


class ContrastiveLLaVATrainer(ContrastiveTrainerMixin, LLaVATrainer):
    def __init__(self, model=None, args=None, tokenizer=None, **kwargs):
        cargs = ContrastiveArguments.from_object(args) if args is not None else ContrastiveArguments(contrastive_weight=0)
        target = find_contrastive_model(model)
        _set_vision_tower_dtype(model, args)
        _init_projector(model, args)
        if cargs.enabled:
            if target is None:
                raise TypeError("--contrastive_weight > 0 needs ContrastiveLlavaForCausalLM "
                                f"(got {type(model).__name__}); run `llava-contrastive train`")
            _require_plain_template()
            target.init_contrastive(cargs, tokenizer)
        super().__init__(model=model, args=args, tokenizer=tokenizer, **kwargs)
        self._setup_contrastive(cargs, nonfinite_max_skips=getattr(args, "nonfinite_max_skips", 0),
                                elastic_data_order=getattr(args, "elastic_data_order", False))
        if self._contrastive_model is not None:
            logger.info("contrastive: %s weight=%g T0=%g learnable=%s text=%s/%s image=%s/%s head=%s gather=%s "
                        "dedup=%s queue=%d", cargs.contrastive_loss, cargs.contrastive_weight, cargs.temperature,
                        cargs.contrastive_learnable_temperature, cargs.contrastive_text_source, cargs.text_pooling,
                        cargs.contrastive_image_source, cargs.image_pooling, cargs.contrastive_head,
                        cargs.contrastive_gather, cargs.contrastive_mask_duplicates, cargs.contrastive_queue_size)

    # ---- saving: stage 1 writes upstream's files; stage 2 is upstream's save --------------------
    @property
    def _saves_trainable_only(self) -> bool:
        return bool(getattr(self.args, "tune_mm_mlp_adapter", False))

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False):
        if not self._saves_trainable_only:
            if self.is_deepspeed_enabled and not torch.cuda.is_available():
                return Trainer.save_model(self, output_dir, _internal_call)  # upstream's path syncs CUDA
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        ckpt.save_stage1(self.model, output_dir, is_main=self.args.should_save,
                         use_im_start_end=getattr(self.args, "use_im_start_end", False))

    def _save_checkpoint(self, model, trial, *args, **kwargs):
        # a failed write (full disk) stops the run naming the path and the space needed; the manifest
        # is written by the mixin's _rotate_checkpoints once transformers renamed the checkpoint
        if not self._saves_trainable_only:
            return self._guarded_checkpoint_save(
                lambda: super(ContrastiveLLaVATrainer, self)._save_checkpoint(model, trial, *args, **kwargs), trial)
        # upstream's override keeps only mm_projector.bin (not resumable): the full Trainer checkpoint
        # (optimizer, scheduler, RNG, state) with our save_model; transformers 4.37 stages it in
        # tmp-checkpoint-N and renames it when complete
        return self._guarded_checkpoint_save(lambda: Trainer._save_checkpoint(self, model, trial, *args, **kwargs), trial)

    def _save(self, output_dir: Optional[str] = None, state_dict=None):
        if self._saves_trainable_only:
            return  # save_model writes stage-1 files
        super()._save(output_dir, state_dict)

    def _load_stage1_weights(self, model, directory: str) -> None:
        ckpt.load_stage1_weights(model, directory)

    # ---- stage-2 LoRA checkpoints: the non-LoRA trainables (the projector) too ---------------------
    def _save_optimizer_and_scheduler(self, output_dir):
        self._save_non_lora_trainables(output_dir)  # into the staging dir: covered by the manifest
        return super()._save_optimizer_and_scheduler(output_dir)

    def _non_lora_checkpointed(self) -> bool:
        """A LoRA stage 2 without DeepSpeed: transformers' checkpoint holds only the adapter, although
        the projector trains too (upstream's --mm_projector_lr); DeepSpeed's checkpoint holds it."""
        return not self._saves_trainable_only and not self.is_deepspeed_enabled and hasattr(self.model, "peft_config")

    def _save_non_lora_trainables(self, output_dir: str) -> None:
        if not self._non_lora_checkpointed():
            return
        state = ckpt.non_lora_trainables(self.model.named_parameters())
        if state and self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            atomic_torch_save(state, os.path.join(output_dir, NON_LORA_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, NON_LORA_FILE)
        if not (self._non_lora_checkpointed() and os.path.isfile(path)):
            return
        target = model if model is not None else self.model
        state = torch.load(path, map_location="cpu", weights_only=True)
        unknown = sorted(set(state) - {n for n, _ in target.named_parameters()})
        if unknown:
            raise ValueError(f"{path}: parameters {unknown[:3]} are not in this model; resume with the settings "
                             f"of the run that wrote the checkpoint")
        target.load_state_dict(state, strict=False)
        logger.info("resuming the non-LoRA trainables (%d tensors: projector) from %s", len(state), path)

    def _load_rng_state(self, checkpoint):
        """Trainer's RNG restore, loading with weights_only=True (numpy's RNG state allowed
        explicitly): transformers 4.37's own call fails under torch >= 2.6's default."""
        if checkpoint is None:
            return
        name = f"rng_state_{self.args.process_index}.pth" if self.args.world_size > 1 else "rng_state.pth"
        path = os.path.join(checkpoint, name)
        if not os.path.isfile(path):
            logger.warning("no RNG state %s: the resumed run's randomness differs from an uninterrupted one", path)
            return
        state = load_rng_file(path)
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.random.set_rng_state(state["cpu"])
        if torch.cuda.is_available() and "cuda" in state:
            if self.args.parallel_mode == transformers.training_args.ParallelMode.DISTRIBUTED:
                torch.cuda.random.set_rng_state_all(state["cuda"])
            else:
                torch.cuda.random.set_rng_state(state["cuda"])

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """Upstream calls ``train(resume_from_checkpoint=True)`` when output_dir holds checkpoint-*:
        resume from the newest one that verifies against its manifest (transformers would take the
        highest-numbered one, damaged or not); none intact: from step 0."""
        return self._train_guarded(lambda: super(ContrastiveLLaVATrainer, self).train(
            self._resolve_resume(resume_from_checkpoint), *args, **kwargs))


def load_rng_file(path: str):
    safe = _numpy_rng_globals()
    if hasattr(torch.serialization, "safe_globals"):
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location="cpu", weights_only=True)
    return torch.load(path, map_location="cpu")  # torch < 2.5 defaults to full unpickling


def _numpy_rng_globals() -> list:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    safe = [_reconstruct, np.ndarray, np.dtype]
    safe += [getattr(np.dtypes, n) for n in ("UInt32DType", "Float64DType", "Int64DType")
             if hasattr(np, "dtypes") and hasattr(np.dtypes, n)]
    return safe


def _init_projector(model, args) -> None:
    """--mm_projector_init normal: restart the new stage-1 projector from N(0, std) (upstream's
    builder gave it nn.Linear's defaults)."""
    choice = getattr(args, "mm_projector_init", "upstream")
    adapter = getattr(getattr(model, "config", None), "pretrain_mm_mlp_adapter", None)
    check_projector_init(choice, getattr(args, "mm_projector_init_std", 0.02), adapter)
    if choice == "normal" and model is not None:
        projector = model.get_model().mm_projector
        normal_init_(projector, args.mm_projector_init_std, args.seed)
        logger.info("projector: normal init, std %g, seed %d", args.mm_projector_init_std, args.seed)


def _set_vision_tower_dtype(model, args) -> None:
    """Apply --vision_tower_dtype after upstream's own cast (train() casts before the trainer exists)."""
    from llava_contrastive.hosts.llava.args import vision_tower_dtype

    choice = getattr(args, "vision_tower_dtype", "auto") if args is not None else "auto"
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    tower = inner.get_vision_tower() if hasattr(inner, "get_vision_tower") else None
    if tower is None or not getattr(tower, "is_loaded", False):
        return
    dtype = vision_tower_dtype(choice, bf16=bool(getattr(args, "bf16", False)), cuda=torch.cuda.is_available())
    if tower.dtype != dtype:
        logger.info("vision tower: %s -> %s (--vision_tower_dtype %s)", tower.dtype, dtype, choice)
        widening = torch.finfo(dtype).bits > torch.finfo(tower.dtype).bits
        tower.to(dtype=dtype)
        if widening:
            _reload_tower_weights(tower, dtype)


def _reload_tower_weights(tower, dtype: torch.dtype) -> None:
    """After a widening cast the tower has the dtype but still the values upstream's fp16/bf16 cast
    rounded: read the weights again from the tower's checkpoint (frozen, so they equal it)."""
    module = getattr(tower, "vision_tower", None)
    name = getattr(tower, "vision_tower_name", None)
    if module is None or name is None:
        return
    if any(hasattr(p, "ds_id") for p in module.parameters()):
        logger.warning("vision tower: partitioned by ZeRO-3, weights keep upstream's %s rounding", tower.dtype)
        return
    fresh = type(module).from_pretrained(name, torch_dtype=dtype)
    module.load_state_dict(fresh.state_dict())


def _require_plain_template() -> None:
    from llava_contrastive.hosts.llava.compat import import_upstream

    conv = import_upstream("conversation")
    if conv.default_conversation.sep_style != conv.SeparatorStyle.PLAIN:
        raise ValueError(
            f"--contrastive_weight > 0 needs caption-only labels (stage 1, --version plain); the conversation "
            f"template is {conv.default_conversation.version!r}. Pass --contrastive_weight 0 for stage 2.")
