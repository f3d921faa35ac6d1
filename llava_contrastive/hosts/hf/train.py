"""Stage-1 projector pretraining on transformers' native LLaVA, with the contrastive term.

    python -m llava_contrastive.hosts.hf.train \
        --model_name_or_path NATIVE_DIR            # or: --llm_dir LLM --vision_dir CLIP [--pretrain_mm_mlp_adapter mm_projector.bin]
        --data_path blip_laion_cc_sbu_558k.json --image_folder images \
        --output_dir out --per_device_train_batch_size 8 --learning_rate 1e-3 --max_steps 100 \
        --contrastive_weight 0.5 [--contrastive_loss siglip ...]   # every --contrastive_* flag of the core

Only ``model.multi_modal_projector`` and the contrastive head train. The output directory holds
``mm_projector.bin`` (upstream keys: drop-in for upstream stage 2 ``--pretrain_mm_mlp_adapter``),
``contrastive_head.safetensors`` + ``contrastive_config.json`` (the upstream host's head format),
``trainer_state.json``, and (not under ZeRO-3) a complete native checkpoint + processor.

``--save_strategy steps`` writes resumable stage-1 checkpoints: ``checkpoint-N`` holds the projector
and head files, optimizer, scheduler, RNG and trainer state, never the frozen LLM (under DeepSpeed the
engine checkpoint excludes frozen parameters). Each is written into ``tmp-checkpoint-N`` and renamed
when complete. Re-running the same command resumes from the last complete checkpoint in
``--output_dir`` (leftovers of an interrupted save are removed first); ``--resume_from_checkpoint DIR``
resumes from a given one.
Multi-rank CPU: ``torchrun --nproc_per_node 2 -m llava_contrastive.hosts.hf.train ... --use_cpu``
(``use_cpu`` is forced on machines without CUDA; without it each rank trains on everything).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.distributed as dist
import transformers
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments

from ...checkpointing import (TRAINER_STATE_FILE, clean_incomplete_checkpoints, commit_staged, is_complete_checkpoint,
                              last_complete_checkpoint, staging_dir)
from ...config import ContrastiveArguments
from ...faults import fault_step
from ...head import clamp_logit_scale, find_contrastive_model, optimizer_with_head_group
from . import checkpoint as ckpt
from . import convert
from .data import Collator, PretrainDataset
from .launch import init_distributed_for_deepspeed, with_cpu_flag
from .model import ContrastiveLlavaForConditionalGeneration, ContrastiveLlavaOutput

logger = logging.getLogger("llava_contrastive")
_STAT_KEYS = ("ntp_loss", "contrastive_loss", "steps", "rows", "i2t_hits", "t2i_hits", "acc_rows")


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "a native LLaVA checkpoint (convert.py build)"})
    llm_dir: Optional[str] = field(default=None, metadata={"help": "build the native model from this Llama ..."})
    vision_dir: Optional[str] = field(default=None, metadata={"help": "... and this CLIP vision tower"})
    pretrain_mm_mlp_adapter: Optional[str] = field(default=None, metadata={"help": "initial projector (upstream or native keys)"})
    vision_feature_layer: int = field(default=-2)


@dataclass
class DataArguments:
    data_path: str = field(default=None, metadata={"help": "LLaVA-Pretrain JSON"})
    image_folder: str = field(default=None)
    model_max_length: int = field(default=2048, metadata={"help": "counts the image tokens too (576 at 336 px)"})


class ClampLogitScale(TrainerCallback):
    """Keeps the logit scale under its cap after each optimizer step."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            clamp_logit_scale(model)


class ContrastiveHFTrainer(Trainer):
    """transformers.Trainer + the head's optimizer group (--contrastive_lr, no decay) and the
    ntp_loss / contrastive_loss / logit_scale / in-batch accuracy logs (averaged over ranks)."""

    def __init__(self, *a, contrastive_args: ContrastiveArguments, **kw):
        super().__init__(*a, **kw)
        self.contrastive_args = contrastive_args
        # transformers 5 divides the NTP by the token count of all ranks and multiplies the loss by the
        # world size: that factor would multiply the contrastive term too (it is already a global
        # mean on every rank). Per-rank means averaged over ranks instead, as upstream's trainer does.
        self.model_accepts_loss_kwargs = False
        self._contrastive_model = find_contrastive_model(self.model) if contrastive_args.enabled else None
        self._stats: Dict[str, torch.Tensor] = {}
        if self._contrastive_model is not None:
            self.add_callback(ClampLogitScale())

    def create_optimizer(self, *a, **kw):
        head_params = []
        if self.optimizer is None and self._contrastive_model is not None:
            head_params = self._contrastive_model.contrastive_head.trainable_parameters()
        lr = self.contrastive_args.contrastive_lr or self.args.learning_rate
        self.optimizer = optimizer_with_head_group(
            lambda: super(ContrastiveHFTrainer, self).create_optimizer(*a, **kw), head_params, lr)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        if model.training and isinstance(outputs, ContrastiveLlavaOutput) and outputs.contrastive_loss is not None:
            rows = outputs.contrastive_rows
            acc_rows = rows if outputs.i2t_accuracy is not None else torch.zeros_like(rows)
            zero = torch.zeros_like(rows)
            values = {"ntp_loss": outputs.ntp_loss.float(), "contrastive_loss": outputs.contrastive_loss.float(),
                      "steps": torch.ones_like(rows), "rows": rows,
                      "i2t_hits": (outputs.i2t_accuracy if outputs.i2t_accuracy is not None else zero) * acc_rows,
                      "t2i_hits": (outputs.t2i_accuracy if outputs.t2i_accuracy is not None else zero) * acc_rows,
                      "acc_rows": acc_rows}
            for k, v in values.items():
                self._stats[k] = self._stats.get(k, 0) + v.detach().float()
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and self._contrastive_model is not None:
            logs.update(self._pop_logs())
        super().log(logs, *args, **kwargs)

    def _pop_logs(self):
        device = self.args.device
        vec = torch.stack([torch.as_tensor(self._stats.get(k, 0.0), dtype=torch.float32, device=device)
                           for k in _STAT_KEYS])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(vec)
        self._stats = {}
        s = dict(zip(_STAT_KEYS, vec.tolist()))
        if s["steps"] == 0:
            return {}
        out = {"ntp_loss": round(s["ntp_loss"] / s["steps"], 6),
               "contrastive_loss": round(s["contrastive_loss"] / s["steps"], 6),
               "logit_scale": round(float(self._contrastive_model.contrastive_head.logit_scale().detach()), 4)}
        if s["acc_rows"] > 0:
            out["i2t_acc"] = round(s["i2t_hits"] / s["acc_rows"], 4)
            out["t2i_acc"] = round(s["t2i_hits"] / s["acc_rows"], 4)
        return out

    # ---- saving: stage-1 checkpoints -----------------------------------------------------------
    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False):
        """The trainable state only (mm_projector.bin + head files); never the frozen LLM."""
        ckpt.save_stage1_files(self.model, output_dir or self.args.output_dir, is_main=self.args.should_save)

    def _save_checkpoint(self, model, trial):
        """Trainer's checkpoint (stage-1 files, optimizer, scheduler, scaler, RNG, trainer state),
        written into tmp-checkpoint-N and renamed to checkpoint-N once every rank has written its part."""
        from transformers.trainer_callback import ExportableState
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy

        run_dir = self._get_output_dir(trial=trial)
        final = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        staging = staging_dir(final)
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        if self.args.should_save and os.path.exists(staging):
            shutil.rmtree(staging)
        self.accelerator.wait_for_everyone()
        self.save_model(staging, _internal_call=True)
        if self.args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST) \
                and self.state.best_global_step:
            best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
            if best == final or os.path.exists(best):
                self.state.best_model_checkpoint = best
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(staging)
            self._save_scaler(staging)
            self._save_rng_state(staging)
        if self.args.should_save:
            for cb in self.callback_handler.callbacks + [self.control]:
                if isinstance(cb, ExportableState):
                    name = type(cb).__name__
                    if isinstance(self.state.stateful_callbacks.get(name), list):
                        self.state.stateful_callbacks[name].append(cb.state())
                    else:
                        self.state.stateful_callbacks[name] = cb.state()
            self.state.save_to_json(os.path.join(staging, TRAINER_STATE_FILE))
        self.accelerator.wait_for_everyone()  # every rank's RNG state and DeepSpeed shards are in
        if self.args.should_save:
            commit_staged(staging, final)
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub:
            self._push_from_checkpoint(final)
        if self.args.should_save:
            self._rotate(run_dir)

    def _rotate(self, run_dir: str) -> None:
        try:
            from transformers.trainer_utils import rotate_checkpoints
        except ImportError:  # transformers < 5
            self._rotate_checkpoints(use_mtime=False, output_dir=run_dir)
            return
        rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def _save_optimizer_and_scheduler(self, output_dir):
        if fault_step("kill_in_save") == self.state.global_step:
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: die with the checkpoint half-written
        with ckpt.trainable_only_engine_save(self.model_wrapped, enabled=self.is_deepspeed_enabled):
            super()._save_optimizer_and_scheduler(output_dir)

    # ---- resuming ---------------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if ckpt.has_stage1_files(resume_from_checkpoint):
            target = find_contrastive_model(model if model is not None else self.model) or self.model
            logger.info("resuming stage-1 weights (projector, head) from %s", resume_from_checkpoint)
            ckpt.load_stage1_weights(target, resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def train(self, resume_from_checkpoint=None, trial=None, auto_resume: bool = False, **kwargs):
        """``resume_from_checkpoint``: a checkpoint directory, True (the last complete one), or None;
        ``auto_resume``: resume from the last complete checkpoint in output_dir if there is one.
        Leftovers of interrupted saves are removed first."""
        out = self.args.output_dir
        if self.args.should_save:
            clean_incomplete_checkpoints(out)
        self.accelerator.wait_for_everyone()
        if resume_from_checkpoint is True or (resume_from_checkpoint is None and auto_resume):
            found = last_complete_checkpoint(out)
            if found is None and resume_from_checkpoint is True:
                raise ValueError(f"no complete checkpoint-* in {out} to resume from")
            resume_from_checkpoint = found
        elif resume_from_checkpoint:
            if not is_complete_checkpoint(resume_from_checkpoint):
                raise ValueError(f"{resume_from_checkpoint}: not a complete checkpoint (no {TRAINER_STATE_FILE}); "
                                 f"resume from another checkpoint-* or start without --resume_from_checkpoint")
        if resume_from_checkpoint and self.is_world_process_zero():
            logger.warning("resuming from %s", resume_from_checkpoint)
        guard = ckpt.deepspeed_nonstrict_resume() if self.is_deepspeed_enabled else contextlib.nullcontext()
        with guard:
            return super().train(resume_from_checkpoint=resume_from_checkpoint or None, trial=trial, **kwargs)


def save_stage1(trainer: Trainer, model, processor, output_dir: str) -> None:
    """Final output: mm_projector.bin (upstream keys), the head files, trainer_state.json, and a full
    native checkpoint + processor unless ZeRO-3. Collective under ZeRO-3."""
    zero3 = ckpt.is_zero3()
    ckpt.save_stage1_files(model, output_dir, is_main=trainer.args.should_save, zero3=zero3)
    trainer.save_state()
    if trainer.args.should_save and not zero3:
        model.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)


def main(argv=None) -> Trainer:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, ContrastiveArguments))
    margs, dargs, targs, cargs = parser.parse_args_into_dataclasses(args=with_cpu_flag(argv))
    targs.remove_unused_columns = False
    cargs.validate()
    logging.basicConfig(level=logging.INFO if targs.should_log else logging.WARNING)
    transformers.set_seed(targs.seed)  # before the model is built: the projector init follows --seed
    init_distributed_for_deepspeed(targs)

    if margs.model_name_or_path:
        model = ContrastiveLlavaForConditionalGeneration.from_pretrained(margs.model_name_or_path, dtype=torch.float32)
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained(margs.model_name_or_path)
        if margs.pretrain_mm_mlp_adapter:
            convert.load_projector(model, margs.pretrain_mm_mlp_adapter)
    elif margs.llm_dir and margs.vision_dir:
        if transformers.integrations.is_deepspeed_zero3_enabled():
            raise ValueError("under ZeRO-3 build the native checkpoint first (convert.py build) and pass "
                             "--model_name_or_path")
        model, processor = convert.build_native_llava(
            margs.llm_dir, margs.vision_dir, None, projector=margs.pretrain_mm_mlp_adapter,
            vision_feature_layer=margs.vision_feature_layer, model_class=ContrastiveLlavaForConditionalGeneration)
    else:
        raise ValueError("give --model_name_or_path, or --llm_dir and --vision_dir")
    model.config.use_cache = False
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    model.init_contrastive(cargs, processor.tokenizer)

    dataset = PretrainDataset(dargs.data_path, dargs.image_folder, processor,
                              image_seq_length=model.config.image_seq_length, max_length=dargs.model_max_length)
    trainer = ContrastiveHFTrainer(model=model, args=targs, train_dataset=dataset,
                                   data_collator=Collator(processor.tokenizer.pad_token_id),
                                   processing_class=processor, contrastive_args=cargs)
    trainer.train(resume_from_checkpoint=targs.resume_from_checkpoint, auto_resume=True)
    save_stage1(trainer, model, processor, targs.output_dir)
    return trainer


if __name__ == "__main__":
    main()
