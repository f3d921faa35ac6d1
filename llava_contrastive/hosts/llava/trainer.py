"""ContrastiveLLaVATrainer: upstream's LLaVATrainer plus the contrastive term's bookkeeping.

- builds the model's contrastive head (after upstream froze the model) and puts it in its own
  optimizer group (``--contrastive_lr``, no weight decay); empty parameter groups are dropped
- logs ntp_loss, contrastive_loss, logit_scale, in-batch retrieval accuracy and negatives,
  averaged over ranks
- stage 1 checkpoints are resumable (upstream's hold only mm_projector.bin): projector + head +
  optimizer, scheduler, RNG and trainer state; DeepSpeed checkpoints exclude the frozen LLM
- signatures that changed in later transformers releases (compute_loss, _save_checkpoint, log)
  accept the extra arguments
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
import random
from typing import Dict, Optional

import numpy as np
import torch
import torch.distributed as dist
import transformers
from transformers import Trainer, TrainerCallback

from ...config import ContrastiveArguments
from ...head import clamp_logit_scale, find_contrastive_model, optimizer_with_head_group
from . import checkpoint as ckpt
from .compat import LLaVATrainer
from ...faults import fault_step
from ...data_guard import BAD_RECORDS_KEY
from ...nonfinite import (NonFiniteGuard, NonFiniteLossError, agree_on_step, raise_bad_records,  # noqa: F401
                          zero_loss)
from ...train_logs import JointLossStats, joint_loss_means
from .model import ContrastiveCausalLMOutput

logger = logging.getLogger("llava_contrastive")


class ClampLogitScale(TrainerCallback):
    """Keeps the logit scale under its cap after each optimizer step."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            clamp_logit_scale(model)


class ContrastiveLLaVATrainer(LLaVATrainer):
    def __init__(self, model=None, args=None, tokenizer=None, **kwargs):
        self.contrastive_args = ContrastiveArguments.from_object(args) if args is not None else ContrastiveArguments(contrastive_weight=0)
        target = find_contrastive_model(model)
        _set_vision_tower_dtype(model, args)
        if self.contrastive_args.enabled:
            if target is None:
                raise TypeError("--contrastive_weight > 0 needs ContrastiveLlavaForCausalLM "
                                f"(got {type(model).__name__}); run `python -m llava_contrastive.train`")
            _require_plain_template()
            target.init_contrastive(self.contrastive_args, tokenizer)
        super().__init__(model=model, args=args, tokenizer=tokenizer, **kwargs)
        self._contrastive_model = target if self.contrastive_args.enabled else None
        self._stats = JointLossStats()
        if self._contrastive_model is not None:
            self.add_callback(ClampLogitScale())
            cargs = self.contrastive_args
            logger.info("contrastive: %s weight=%g T0=%g learnable=%s text=%s/%s image=%s/%s head=%s gather=%s "
                        "dedup=%s queue=%d", cargs.contrastive_loss, cargs.contrastive_weight, cargs.temperature,
                        cargs.contrastive_learnable_temperature, cargs.contrastive_text_source, cargs.text_pooling,
                        cargs.contrastive_image_source, cargs.image_pooling, cargs.contrastive_head,
                        cargs.contrastive_gather, cargs.contrastive_mask_duplicates, cargs.contrastive_queue_size)

    # ---- optimisation -------------------------------------------------------------------------
    def create_optimizer(self):
        head_params = []
        if self.optimizer is None and self._contrastive_model is not None:
            head_params = self._contrastive_model.contrastive_head.trainable_parameters()
        lr = self.contrastive_args.contrastive_lr or self.args.learning_rate
        self.optimizer = optimizer_with_head_group(
            lambda: super(ContrastiveLLaVATrainer, self).create_optimizer(), head_params, lr)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        bad_records = inputs.pop(BAD_RECORDS_KEY, None) or []
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        if model.training:
            if fault_step("nonfinite_loss") == self.state.global_step + 1:
                loss = loss * float("nan")
            loss = self._guard_finite(model, loss, outputs, bad_records)
            if isinstance(outputs, ContrastiveCausalLMOutput):
                self._stats.add(outputs)
        return (loss, outputs) if return_outputs else loss

    def _guard_finite(self, model, loss, outputs, bad_records=()):
        """Stop (or, within --nonfinite_max_skips, zero this micro-batch's gradient) on a non-finite
        loss or logit scale; stop on a record that went bad during training (--data_check_policy
        error). All ranks agree through one all-reduce, so none is left waiting in a collective."""
        scale = getattr(outputs, "logit_scale", None)
        rows = getattr(outputs, "contrastive_rows", None)
        verdict = agree_on_step(loss, scale, len(bad_records), rows)  # the decision logic: core nonfinite.py
        if rows is not None:
            pairs = verdict.global_rows if (verdict.distributed and self.contrastive_args.contrastive_gather) \
                else float(rows)
            self._count_skipped_term(pairs)
        step = self.state.global_step + 1
        raise_bad_records(verdict, step, bad_records)
        guard = getattr(self, "_nonfinite_guard", None)
        if guard is None:
            guard = self._nonfinite_guard = NonFiniteGuard(int(getattr(self.args, "nonfinite_max_skips", 0)))
        values = {"loss": loss.detach(), "ntp_loss": getattr(outputs, "ntp_loss", None),
                  "contrastive_loss": getattr(outputs, "contrastive_loss", None), "logit_scale": scale}
        if not guard.check(verdict, step, values, self.args.output_dir):
            return loss
        return zero_loss(model.parameters())

    def _count_skipped_term(self, pairs: float) -> None:
        """A micro-batch whose global batch holds fewer than 2 image-caption pairs has no negatives:
        the contrastive term is zero there (decided on all ranks together). Counted, logged."""
        queue = self._contrastive_model.contrastive_head.queue if self._contrastive_model is not None else None
        if pairs >= 2 or (queue is not None and int(queue.filled) > 0 and pairs >= 1):
            return
        self._skipped_terms = getattr(self, "_skipped_terms", 0) + 1
        if self._skipped_terms in (1, 10, 100) or self._skipped_terms % 1000 == 0:
            logger.warning("contrastive term skipped at step %d: %d image-caption pair(s) in the global batch, no "
                           "negatives (%d such micro-batches so far)", self.state.global_step + 1, int(pairs),
                           self._skipped_terms)

    def log(self, logs: Dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._contrastive_model is not None:
            logs.update(self._pop_contrastive_logs())
        super().log(logs, *args, **kwargs)

    def _pop_contrastive_logs(self) -> Dict[str, float]:
        """Means since the last log, summed over ranks (every rank logs at the same step)."""
        s = self._stats.pop(self.args.device)
        head = self._contrastive_model.contrastive_head
        logs = joint_loss_means(s, head)
        if not logs:
            return {}
        rows_per_step = s["rows"] / s["steps"]  # per rank and micro-batch
        global_rows = rows_per_step * (s["world"] if self.contrastive_args.contrastive_gather else 1)
        logs["negatives"] = round(max(global_rows - 1, 0) + (int(head.queue.filled) if head.queue is not None else 0), 2)
        if getattr(self, "_skipped_terms", 0):
            logs["contrastive_skipped_total"] = self._skipped_terms
        return logs

    # ---- saving -----------------------------------------------------------------------------
    @property
    def _stage1(self) -> bool:
        return bool(getattr(self.args, "tune_mm_mlp_adapter", False))

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False):
        if not self._stage1:
            if self.is_deepspeed_enabled and not torch.cuda.is_available():
                return Trainer.save_model(self, output_dir, _internal_call)
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        ckpt.save_stage1(self.model, output_dir, is_main=self.args.should_save,
                         use_im_start_end=getattr(self.args, "use_im_start_end", False))

    def _save_checkpoint(self, model, trial, *args, **kwargs):
        if not self._stage1:
            return super()._save_checkpoint(model, trial, *args, **kwargs)
        # the full Trainer checkpoint (optimizer, scheduler, RNG, state) with our save_model;
        # transformers stages it in tmp-checkpoint-N and renames it when complete
        return Trainer._save_checkpoint(self, model, trial, *args, **kwargs)

    def _save_optimizer_and_scheduler(self, output_dir):
        if fault_step("kill_in_save") == self.state.global_step:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)  # test hook: die with the checkpoint half-written
        engine = self.model_wrapped
        if self._stage1 and self.is_deepspeed_enabled and "exclude_frozen_parameters" in \
                inspect.signature(engine.save_checkpoint).parameters:
            original = engine.save_checkpoint

            def save_trainable_only(*args, **kwargs):  # the frozen LLM would be GBs per checkpoint
                kwargs.setdefault("exclude_frozen_parameters", True)
                return original(*args, **kwargs)

            engine.save_checkpoint = save_trainable_only
            try:
                return super()._save_optimizer_and_scheduler(output_dir)
            finally:
                del engine.save_checkpoint  # back to the class method
        super()._save_optimizer_and_scheduler(output_dir)

    def _save(self, output_dir: Optional[str] = None, state_dict=None):
        if self._stage1:
            return  # save_model writes stage-1 files
        super()._save(output_dir, state_dict)

    # ---- resuming ---------------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self._stage1 and os.path.isfile(os.path.join(resume_from_checkpoint, ckpt.PROJECTOR_FILE)):
            target = find_contrastive_model(model if model is not None else self.model) or self.model
            logger.info("resuming stage-1 weights from %s", resume_from_checkpoint)
            ckpt.load_stage1_weights(target, resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

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

    def train(self, *args, **kwargs):
        from ...data_check import DataCheckError

        self._remove_stale_staging()
        with _deepspeed_nonstrict_module_load(self._stage1):
            try:
                return super().train(*args, **kwargs)
            except DataCheckError as err:
                # agreed: every rank raised at the same step (the per-step all-reduce), so all can save
                # collectively. An error of one rank only (e.g. the runtime-skip limit under skip) must
                # not enter a collective save the other ranks never reach: that rank stops and the
                # launcher ends the others; the last complete checkpoint is the resume point.
                if getattr(err, "agreed", False) or self.args.world_size == 1:
                    logger.error("saving a resumable checkpoint at step %d before stopping", self.state.global_step)
                    self._save_checkpoint(self.model, trial=None)
                raise

    def _remove_stale_staging(self) -> None:
        """A crash while saving leaves tmp-checkpoint-N (never picked up for resuming: only complete,
        renamed checkpoint-N are); remove it so the next save at that step starts clean."""
        import glob
        import shutil

        if self.args.should_save:
            for stale in glob.glob(os.path.join(self.args.output_dir, "tmp-checkpoint-*")):
                logger.warning("removing incomplete checkpoint %s (a save was interrupted)", stale)
                shutil.rmtree(stale, ignore_errors=True)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()


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


@contextlib.contextmanager
def _deepspeed_nonstrict_module_load(enabled: bool):
    """Stage-1 DeepSpeed checkpoints exclude the frozen LLM, so the engine must load the module
    non-strictly (transformers 4.37 only does so for PEFT models)."""
    if not enabled:
        yield
        return
    import transformers.trainer as hf_trainer

    original = hf_trainer.deepspeed_load_checkpoint

    def load(engine, checkpoint_path, *args, **kwargs):
        import glob

        if not glob.glob(os.path.join(checkpoint_path, "global_step*")):
            raise ValueError(f"Can't find a valid DeepSpeed checkpoint at {checkpoint_path}")
        load_path, _ = engine.load_checkpoint(checkpoint_path, load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise ValueError(f"[deepspeed] failed to resume from checkpoint {checkpoint_path}")

    hf_trainer.deepspeed_load_checkpoint = load
    try:
        yield
    finally:
        hf_trainer.deepspeed_load_checkpoint = original


def _set_vision_tower_dtype(model, args) -> None:
    """Apply --vision_tower_dtype after upstream's own cast (train() casts before the trainer exists)."""
    from .args import vision_tower_dtype

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
    from .compat import import_upstream

    conv = import_upstream("conversation")
    if conv.default_conversation.sep_style != conv.SeparatorStyle.PLAIN:
        raise ValueError(
            f"--contrastive_weight > 0 needs caption-only labels (stage 1, --version plain); the conversation "
            f"template is {conv.default_conversation.version!r}. Pass --contrastive_weight 0 for stage 2.")
