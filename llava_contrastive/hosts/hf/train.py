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
engine checkpoint excludes frozen parameters). Each is written into ``tmp-checkpoint-N``, sealed with
``manifest.json`` (size and sha256 of every file, written last) and renamed when complete. Re-running
the same command resumes from the newest checkpoint that verifies against its manifest in
``--output_dir`` (a damaged newer one is reported and skipped; leftovers of an interrupted save are
removed first); ``--resume_from_checkpoint DIR`` resumes from a given one. A save that fails with a
full disk stops the run naming the path and the space needed, the previous checkpoint intact.
Multi-rank CPU: ``torchrun --nproc_per_node 2 -m llava_contrastive.hosts.hf.train ... --use_cpu``
(``use_cpu`` is forced on machines without CUDA; without it each rank trains on everything).

Reliability, the upstream host's guarantees through the same core code (``data/check.py``,
``data/guard.py``, ``training/step_guard.py``) and flags:

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

import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Dict, Optional

if __name__ == "__main__":  # `python -m ...hosts.hf.train`: user errors exit 2 before torch and transformers load
    from llava_contrastive.training.preflight import run_preflight as _preflight

    _preflight(sys.argv[1:], host="hf")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402
from transformers import HfArgumentParser, Trainer, TrainingArguments

from llava_contrastive.core.config import ContrastiveArguments
from llava_contrastive.data.check import DataCheckArguments, DataCheckError, load_records, validate_settings
from llava_contrastive.data.guard import (FlaggingCollator, GuardedDataset, data_check_settings, note_skipped,
                                          run_data_check, runtime_log_path)
from llava_contrastive.hosts.common import ContrastiveTrainerMixin
from llava_contrastive.hosts.hf import checkpoint as ckpt
from llava_contrastive.hosts.hf import convert
from llava_contrastive.hosts.hf.data import Collator, PretrainDataset
from llava_contrastive.hosts.hf.launch import (init_distributed_for_deepspeed, joined_report_to, logging_dir_to_env,
                                              split_report_to, with_cpu_flag)
from llava_contrastive.hosts.hf.model import ContrastiveLlavaForConditionalGeneration
from llava_contrastive.training.elastic import ElasticArguments
from llava_contrastive.training.checkpointing import (TRAINER_STATE_FILE, CheckpointSaveError,
                                                      commit_staged, staging_dir,
                                                      write_manifest)
from llava_contrastive.training.step_guard import NonFiniteArguments, NonFiniteLossError

logger = logging.getLogger("llava_contrastive")


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "a native LLaVA checkpoint (convert.py build)"})
    llm_dir: Optional[str] = field(default=None, metadata={"help": "build the native model from this Llama ..."})
    vision_dir: Optional[str] = field(default=None, metadata={"help": "... and this CLIP or SigLIP vision tower"})
    pretrain_mm_mlp_adapter: Optional[str] = field(default=None, metadata={"help": "initial projector (upstream or native keys)"})
    vision_feature_layer: int = field(default=-2)
    mm_projector_type: Optional[str] = field(default=None, metadata={
        "help": "with --llm_dir/--vision_dir: mlp2x_gelu or linear (default: that of --pretrain_mm_mlp_adapter, "
                "else mlp2x_gelu); a native checkpoint's own is kept"})


@dataclass
class DataArguments:
    data_path: str = field(default=None, metadata={"help": "LLaVA-Pretrain JSON"})
    image_folder: str = field(default=None)
    model_max_length: int = field(default=2048, metadata={"help": "counts the image tokens too (576 at 336 px)"})


class ContrastiveHFTrainer(ContrastiveTrainerMixin, Trainer):
    """transformers.Trainer + the joint-loss bookkeeping of hosts/common.py (head optimizer group,
    step guard, logs averaged over ranks, trainable-only checkpoints)."""

    def __init__(self, *a, contrastive_args: ContrastiveArguments, nonfinite_max_skips: int = 0,
                 elastic_data_order: bool = False, **kw):
        super().__init__(*a, **kw)
        # transformers 5 divides the NTP by the token count of all ranks and multiplies the loss by the
        # world size: that factor would multiply the contrastive term too (it is already a global
        # mean on every rank). Per-rank means averaged over ranks instead, as upstream's trainer does.
        self.model_accepts_loss_kwargs = False
        self._setup_contrastive(contrastive_args, nonfinite_max_skips, elastic_data_order)

    def _load_stage1_weights(self, model, directory: str) -> None:
        ckpt.load_stage1_weights(model, directory)

    # ---- saving: stage-1 checkpoints -----------------------------------------------------------
    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False):
        """The trainable state only (mm_projector.bin + head files); never the frozen LLM."""
        ckpt.save_stage1_files(self.model, output_dir or self.args.output_dir, is_main=self.args.should_save)

    _overwrites_existing_checkpoint = False  # always staged: an existing checkpoint-N is replaced whole

    def _save_checkpoint(self, model, trial):
        """A failed write (full disk) stops the run naming the path and the space needed (mixin)."""
        return self._guarded_checkpoint_save(lambda: self._write_checkpoint(model, trial), trial)

    def _write_checkpoint(self, model, trial):
        """Trainer's checkpoint (stage-1 files, optimizer, scheduler, scaler, RNG, trainer state),
        written into tmp-checkpoint-N, sealed with its manifest (sizes, sha256; last) and renamed to
        checkpoint-N once every rank has written its part."""
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
            write_manifest(staging)
            commit_staged(staging, final)
            self._verified_checkpoint = final
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub:
            self._push_from_checkpoint(final)
        if self.args.should_save:
            self._rotate_keeping_verified(run_dir)  # never the newest, the last verified or the best one

    def train(self, resume_from_checkpoint=None, trial=None, auto_resume: bool = False, **kwargs):
        """``resume_from_checkpoint``: a checkpoint directory (must verify against its manifest), True
        (the newest checkpoint that verifies), or None; ``auto_resume``: resume from the newest
        verified checkpoint in output_dir if there is one. Leftovers of interrupted saves are removed first."""
        required = resume_from_checkpoint is True
        if resume_from_checkpoint is None and auto_resume:
            resume_from_checkpoint = True

        def train_from_verified():
            # after _train_guarded removed what interrupted saves left: the newest checkpoint that
            # verifies against its manifest (a damaged one is reported and skipped); an explicit
            # directory must verify
            resume = self._resolve_resume(resume_from_checkpoint, required=required)
            if resume and self.is_world_process_zero():
                logger.warning("resuming from %s", resume)
            return super(ContrastiveHFTrainer, self).train(resume_from_checkpoint=resume or None, trial=trial,
                                                           **kwargs)

        return self._train_guarded(train_from_verified)


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


def run(argv=None) -> Trainer:
    from llava_contrastive.training.preflight import run_preflight, strip_flag

    argv = list(sys.argv[1:] if argv is None else argv)
    run_preflight(argv, host="hf")  # user errors: exit 2 here, before any model loads
    from llava_contrastive.training.jit_ops import prepare_if_requested

    prepare_if_requested(argv)  # DeepSpeed's JIT op, past a lock a killed build left (else a silent hang)
    argv = strip_flag(argv, "overwrite_output_dir")  # acted on by pre-flight; transformers 5 has no such flag
    parser = HfArgumentParser((ModelArguments, DataArguments, DataCheckArguments, NonFiniteArguments,
                               ElasticArguments, TrainingArguments, ContrastiveArguments))
    margs, dargs, check_args, nargs, eargs, targs, cargs = parser.parse_args_into_dataclasses(
        args=with_cpu_flag(joined_report_to(logging_dir_to_env(argv))))
    split_report_to(targs)
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
            seed=targs.seed, projector_type=margs.mm_projector_type)
    else:
        raise ValueError("give --model_name_or_path, or --llm_dir and --vision_dir")
    model.config.use_cache = False
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    convert.freeze_fixed_projector_parts(model)
    model.init_contrastive(cargs, processor.tokenizer)

    records = checked_records(dargs, check, targs, processor.tokenizer, model.config.image_seq_length)
    dataset = PretrainDataset(dargs.data_path, dargs.image_folder, processor, records=records,
                              image_seq_length=model.config.image_seq_length, max_length=dargs.model_max_length)
    dataset = GuardedDataset(dataset, check["data_check_policy"], log_path=runtime_log_path(targs.output_dir))
    trainer = ContrastiveHFTrainer(model=model, args=targs, train_dataset=dataset,
                                   data_collator=FlaggingCollator(Collator(processor.tokenizer.pad_token_id)),
                                   processing_class=processor, contrastive_args=cargs,
                                   nonfinite_max_skips=nargs.nonfinite_max_skips,
                                   elastic_data_order=eargs.elastic_data_order)
    trainer.train(resume_from_checkpoint=targs.resume_from_checkpoint, auto_resume=True)
    save_stage1(trainer, model, processor, targs.output_dir)
    return trainer


def main(argv=None) -> int:
    """``run`` for the command line: a refused corpus, a record that went bad under policy error, a
    non-finite loss or a checkpoint save that failed (full disk) ends the process with exit code 1 and
    the message (every rank prints it; the ranks leave the process group together), not a traceback.
    User errors (bad flags, missing paths, a resume with other settings: training/preflight.py, before
    any model loads; a text cache built for other settings) exit with code 2."""
    from llava_contrastive.core.text_cache import TextCacheMismatch

    try:
        run(argv)
    except TextCacheMismatch as err:  # --contrastive_text_cache built for other settings (user error)
        _write_stderr(f"error: {err}\n")
        return 2
    except (DataCheckError, NonFiniteLossError, CheckpointSaveError) as err:
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
    sys.exit(main())
