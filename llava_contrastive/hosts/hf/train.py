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

Reliability, the upstream host's guarantees through the same core code (``data_check.py``,
``data_guard.py``, ``nonfinite.py``) and flags:

* ``--data_check quick|full|off`` / ``--data_check_policy error|skip`` / ``--data_check_workers`` /
  ``--data_check_cache``: the corpus is checked once (rank 0, broadcast) before training;
  ``OUTPUT_DIR/data_check_report.json``; under ``error`` every rank stops before step 1 naming the bad
  records and the fix (exit code 1, nothing trained, no checkpoint); under ``skip`` only the good
  records are trained on and ``OUTPUT_DIR/skipped_records.json`` lists the others.
* a record that fails to load during training: ``skip`` replaces it by the next loadable record
  (counted: ``runtime_skipped_records.jsonl``, ``runtime_skipped_records`` in the logs; at most 1% + 10);
  ``error`` stops all ranks at that step, after saving a resumable ``checkpoint-N`` (N = the last
  completed step), naming the record; the same command resumes once the file is back.
* ``--nonfinite_max_skips N`` (default 0): a non-finite loss or logit scale stops the run naming the
  step and the values, the last checkpoint intact; within N, that micro-batch gets a zero gradient
  (``nonfinite_skipped_total`` in the logs). All ranks decide together (one all-reduce per micro-batch).

Trainer internals relied on (transformers 5.23): ``compute_loss`` (public: the guard runs there, after
the forward), ``log`` and ``train`` (public), the batch reaching ``compute_loss`` as the collator built
it (a list-of-strings key survives ``_prepare_inputs``), and the existing ``_save_checkpoint`` override
below (``_save_optimizer_and_scheduler``, ``_save_scaler``, ``_save_rng_state``) to save the checkpoint
before stopping.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.distributed as dist
import transformers
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments

from ...checkpointing import (TRAINER_STATE_FILE, clean_incomplete_checkpoints, commit_staged, is_complete_checkpoint,
                              last_complete_checkpoint, staging_dir)
from ...config import ContrastiveArguments
from ...data_check import DataCheckArguments, DataCheckError, load_records, validate_settings
from ...data_guard import (BAD_RECORDS_KEY, FlaggingCollator, GuardedDataset, data_check_settings, note_skipped,
                           run_data_check, runtime_log_path)
from ...faults import fault_step
from ...head import clamp_logit_scale, find_contrastive_model, optimizer_with_head_group
from ...nonfinite import (NonFiniteArguments, NonFiniteGuard, NonFiniteLossError, agree_on_step, raise_bad_records,
                          zero_loss)
from ...train_logs import JointLossStats, joint_loss_means
from . import checkpoint as ckpt
from . import convert
from .data import Collator, PretrainDataset
from .launch import init_distributed_for_deepspeed, with_cpu_flag
from .model import ContrastiveLlavaForConditionalGeneration, ContrastiveLlavaOutput

logger = logging.getLogger("llava_contrastive")


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

    def __init__(self, *a, contrastive_args: ContrastiveArguments, nonfinite_max_skips: int = 0, **kw):
        super().__init__(*a, **kw)
        self.contrastive_args = contrastive_args
        self.nonfinite_guard = NonFiniteGuard(nonfinite_max_skips)
        # transformers 5 divides the NTP by the token count of all ranks and multiplies the loss by the
        # world size: that factor would multiply the contrastive term too (it is already a global
        # mean on every rank). Per-rank means averaged over ranks instead, as upstream's trainer does.
        self.model_accepts_loss_kwargs = False
        self._contrastive_model = find_contrastive_model(self.model) if contrastive_args.enabled else None
        self._stats = JointLossStats()
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
        bad_records = inputs.pop(BAD_RECORDS_KEY, None) or []
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        if model.training:
            if fault_step("nonfinite_loss") == self.state.global_step + 1:
                loss = loss * float("nan")  # test hook (llava_contrastive/faults.py)
            loss = self._guard_step(model, loss, outputs, bad_records)
        if model.training and isinstance(outputs, ContrastiveLlavaOutput) and outputs.contrastive_loss is not None:
            self._stats.add(outputs)
        return (loss, outputs) if return_outputs else loss

    def _guard_step(self, model, loss, outputs, bad_records):
        """One all-reduce per micro-batch (core nonfinite.py): a record that failed to load on any rank
        (--data_check_policy error) makes every rank raise DataCheckError at this step (train() saves a
        checkpoint first); a non-finite loss / logit scale on any rank stops the run, or within
        --nonfinite_max_skips gives this micro-batch a zero gradient on every rank."""
        scale = getattr(outputs, "logit_scale", None)
        verdict = agree_on_step(loss, scale, len(bad_records))
        step = self.state.global_step + 1
        raise_bad_records(verdict, step, bad_records)
        values = {"loss": loss.detach(), "ntp_loss": getattr(outputs, "ntp_loss", None),
                  "contrastive_loss": getattr(outputs, "contrastive_loss", None), "logit_scale": scale}
        if not self.nonfinite_guard.check(verdict, step, values, self.args.output_dir):
            return loss
        return zero_loss(model.parameters())

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:
            logs.update(self._pop_logs())
        super().log(logs, *args, **kwargs)

    def _pop_logs(self):
        """Means since the last log, summed over ranks (every rank logs at the same step), and the
        reliability counters (records replaced during training on all ranks, skipped non-finite steps)."""
        runtime_skips = float(getattr(self.train_dataset, "runtime_skips", 0) or 0)
        s = self._stats.pop(self.args.device, extra={"runtime_skips": runtime_skips})
        out = {}
        if s["runtime_skips"]:
            out["runtime_skipped_records"] = int(s["runtime_skips"])
        if self.nonfinite_guard.count:
            out["nonfinite_skipped_total"] = self.nonfinite_guard.count
        if self._contrastive_model is not None:
            out.update(joint_loss_means(s, self._contrastive_model.contrastive_head))
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
            try:
                return super().train(resume_from_checkpoint=resume_from_checkpoint or None, trial=trial, **kwargs)
            except DataCheckError as err:
                # a record failed to load under --data_check_policy error: every rank raised at the same
                # step (_guard_step), so they can save collectively; a DataCheckError of one rank only
                # (e.g. more runtime skips than allowed) cannot save without the others: it just stops
                if getattr(err, "agreed", False) or self.args.world_size == 1:
                    logger.error("saving a resumable checkpoint at step %d before stopping", self.state.global_step)
                    self._save_checkpoint(self.model, trial=None)
                raise


def save_stage1(trainer: Trainer, model, processor, output_dir: str) -> None:
    """Final output: mm_projector.bin (upstream keys), the head files, trainer_state.json, and a full
    native checkpoint + processor unless ZeRO-3. Collective under ZeRO-3."""
    zero3 = ckpt.is_zero3()
    ckpt.save_stage1_files(model, output_dir, is_main=trainer.args.should_save, zero3=zero3)
    trainer.save_state()
    if trainer.args.should_save and not zero3:
        model.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)


def checked_records(dargs: DataArguments, check: Dict, targs: TrainingArguments, tokenizer, image_tokens: int):
    """The records to train on: all of them (``--data_check off``) or, after the pre-flight check
    (once, on rank 0), the good ones; under ``--data_check_policy error`` with bad records every rank
    raises DataCheckError here, before a trainer exists."""
    records = load_records(dargs.data_path)
    if check["data_check"] == "off":
        return records
    _ = targs.device  # the process group exists from here on (rank 0 checks, the others receive)
    is_main = targs.should_save
    report = run_data_check(records, data_path=dargs.data_path, image_folder=dargs.image_folder,
                            output_dir=targs.output_dir, is_main=is_main, settings=check, tokenizer=tokenizer,
                            model_max_length=dargs.model_max_length, image_tokens=int(image_tokens), stage="pretrain")
    if report.bad:
        records = [records[i] for i in report.good_indices]
    note_skipped(report, check["data_check_policy"], targs.output_dir, is_main)
    return records


def main(argv=None) -> Trainer:
    parser = HfArgumentParser((ModelArguments, DataArguments, DataCheckArguments, NonFiniteArguments,
                               TrainingArguments, ContrastiveArguments))
    margs, dargs, check_args, nargs, targs, cargs = parser.parse_args_into_dataclasses(args=with_cpu_flag(argv))
    targs.remove_unused_columns = False
    cargs.validate()
    check = data_check_settings(check_args)
    validate_settings(check["data_check"], check["data_check_policy"])
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
            vision_feature_layer=margs.vision_feature_layer, model_class=ContrastiveLlavaForConditionalGeneration,
            seed=targs.seed)
    else:
        raise ValueError("give --model_name_or_path, or --llm_dir and --vision_dir")
    model.config.use_cache = False
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    model.init_contrastive(cargs, processor.tokenizer)

    records = checked_records(dargs, check, targs, processor.tokenizer, model.config.image_seq_length)
    dataset = PretrainDataset(dargs.data_path, dargs.image_folder, processor, records=records,
                              image_seq_length=model.config.image_seq_length, max_length=dargs.model_max_length)
    dataset = GuardedDataset(dataset, check["data_check_policy"], log_path=runtime_log_path(targs.output_dir))
    trainer = ContrastiveHFTrainer(model=model, args=targs, train_dataset=dataset,
                                   data_collator=FlaggingCollator(Collator(processor.tokenizer.pad_token_id)),
                                   processing_class=processor, contrastive_args=cargs,
                                   nonfinite_max_skips=nargs.nonfinite_max_skips)
    trainer.train(resume_from_checkpoint=targs.resume_from_checkpoint, auto_resume=True)
    save_stage1(trainer, model, processor, targs.output_dir)
    return trainer


def cli(argv=None) -> int:
    """``main`` for the command line: a refused corpus, a record that went bad under policy error or a
    non-finite loss ends the process with exit code 1 and the message (every rank prints it; the
    ranks leave the process group together), not a traceback."""
    try:
        main(argv)
    except (DataCheckError, NonFiniteLossError) as err:
        rank = int(os.environ.get("RANK", "0") or 0)
        _write_stderr(f"[rank {rank}] {type(err).__name__}: {err}\n")
        # raised on every rank at the same point (the pre-flight report, the per-step all-reduce): leave
        # together; an error of one rank only (e.g. too many runtime skips) just exits, and the launcher
        # stops the others
        if isinstance(err, NonFiniteLossError) or getattr(err, "agreed", False) or getattr(err, "report", None):
            _leave_process_group()
        return 1
    _leave_process_group()
    return 0


def _write_stderr(text: str) -> None:
    """One write call, so that the messages of several ranks sharing the launcher's stderr do not
    interleave (print() writes the text and the newline separately)."""
    sys.stderr.flush()
    data = text.encode("utf-8", "replace")
    try:
        while data:
            data = data[os.write(2, data):]
    except OSError:
        pass


def _leave_process_group() -> None:
    """Tear the process group down before interpreter exit (left to the atexit order, gloo's threads
    can abort the process after everything was saved)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - leaving anyway
            pass


if __name__ == "__main__":
    sys.exit(cli())
