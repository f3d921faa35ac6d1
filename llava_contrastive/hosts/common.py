"""What both hosts do alike: the trainer mixin, the model mixin and the model output fields.

A host folder (``hosts/llava``, ``hosts/hf``, a third one for LLaVA-NeXT ...) holds only what differs
between host libraries: where the projected image tokens come from, which LLM module runs the
prompted text pass, how stage-1 files are saved, and the Trainer signatures of its transformers
release. Everything here works with transformers 4.37 (upstream's pin) and 5.x.

Trainer mixin (``ContrastiveTrainerMixin``, first in the MRO, before the host's Trainer):
- the head's own optimizer group (``--contrastive_lr``, no weight decay), empty groups dropped;
- ``compute_loss``: the per-step guard (non-finite loss / logit scale, records that went bad, the
  skipped contrastive term; one all-reduce, all ranks agree) and the joint-loss statistics;
- ``log``: ntp_loss, contrastive_loss, logit_scale, in-batch accuracy, negatives and the
  reliability counters, reduced over ranks;
- stage-1 checkpoints hold only what trains (DeepSpeed engine saves skip frozen parameters and
  load non-strictly); on a DataCheckError that all ranks agreed on, a resumable checkpoint is saved
  before stopping;
- every checkpoint gets a manifest (sizes, sha256) written last; resumes use the newest checkpoint
  that verifies; ``save_total_limit`` never deletes the last verified one; a save that fails with
  OSError (full disk) stops the run with CheckpointSaveError, the incomplete save removed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import inspect
import logging
import os
import shutil
import signal
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from transformers import TrainerCallback

from llava_contrastive.core.config import ContrastiveArguments
from llava_contrastive.core.head import (ContrastiveHead, clamp_logit_scale, find_contrastive_model,
                                         optimizer_with_head_group)
from llava_contrastive.core.pooling import caption_keys, pool
from llava_contrastive.core.prompts import build_prompt_batch, resolve_template, split_template, whitespace_token_ids
from llava_contrastive.core.text_cache import (TextEmbeddingCache, cache_identity, fill_cache, model_fingerprint,
                                               unique_captions)
from llava_contrastive.core.text_queue import validate_queue_usage
from llava_contrastive.data.check import DataCheckError
from llava_contrastive.data.guard import BAD_RECORDS_KEY
from llava_contrastive.training import elastic
from llava_contrastive.training.checkpointing import (PROJECTOR_FILE, CheckpointSaveError, atomic_torch_save,
                                                      checkpoint_dirs,
                                                      checkpoint_step, clean_incomplete_checkpoints, dir_bytes,
                                                      free_bytes, is_complete_checkpoint, last_complete_checkpoint,
                                                      load_head_buffers,
                                                      rotation_victims, save_failure_message, staging_dir,
                                                      verify_checkpoint, write_manifest)
from llava_contrastive.training.faults import failing_torch_save, fault_step
from llava_contrastive.training.logs import JointLossStats, joint_loss_means
from llava_contrastive.training.step_guard import NonFiniteGuard, agree_on_step, raise_bad_records, zero_loss

logger = logging.getLogger("llava_contrastive")

# the per-micro-batch quantities a contrastive model output carries beside transformers' fields
OUTPUT_FIELDS = ("ntp_loss", "contrastive_loss", "logit_scale",
                 "contrastive_rows",  # valid pairs in this rank's micro-batch
                 "i2t_accuracy", "t2i_accuracy")  # in-batch, this rank's micro-batch


def normal_init_(module: torch.nn.Module, std: float, seed: int) -> None:
    """Every Linear of ``module``: weights ~ N(0, std), zero biases, from a generator seeded with
    ``seed`` (the global RNG stream is left as it was). Under ZeRO-3 the partitioned weights are
    gathered, set on rank 0 and scattered."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params = [p for p in module.parameters()]
    gathered = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    with gathered, torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, torch.nn.Linear):
                w = torch.randn(layer.weight.shape, generator=gen, dtype=torch.float32) * std
                layer.weight.copy_(w.to(layer.weight.dtype))
                if layer.bias is not None:
                    layer.bias.zero_()


def contrastive_output_class(base: type, name: str, module: str) -> type:
    """``base`` (a transformers ModelOutput dataclass) plus the OUTPUT_FIELDS, all defaulting to None."""
    fields = [(f, Optional[torch.FloatTensor], dataclasses.field(default=None)) for f in OUTPUT_FIELDS]
    return dataclasses.make_dataclass(name, fields, bases=(base,), namespace={"__module__": module})


# ---- model ------------------------------------------------------------------------------------------
class ContrastiveModelMixin:
    """Set-up and text embeddings shared by both hosts' contrastive models. A host defines
    ``_contrastive_hidden_size()`` and ``_text_decoder()`` (the LLM body that runs the prompted text
    pass) and may refine ``_check_contrastive_args``."""

    contrastive_head: Optional[ContrastiveHead]
    contrastive_args: Optional[ContrastiveArguments]

    def _init_contrastive_state(self, config) -> None:
        self.contrastive_head = None
        self.contrastive_args = None
        self._prompt_ids = None
        self._separator_ids: Optional[torch.Tensor] = None
        saved = getattr(config, "contrastive", None)
        if isinstance(saved, dict):  # a saved run: rebuild its head (weights come from the checkpoint)
            self.init_contrastive(ContrastiveArguments.from_object(saved), tokenizer=None)

    def _contrastive_hidden_size(self) -> int:
        raise NotImplementedError

    def _text_decoder(self) -> torch.nn.Module:
        raise NotImplementedError

    def _check_contrastive_args(self, args: ContrastiveArguments) -> None:
        """Host-specific refusals (raise ValueError naming the flag and the fix)."""

    def init_contrastive(self, args: ContrastiveArguments, tokenizer=None) -> None:
        """Build the contrastive head and the tokenised separator / prompt pieces. Call after the
        model was frozen (``requires_grad_(False)``): the head's learnable parameters stay trainable."""
        args.validate()
        self._check_contrastive_args(args)
        weight = self.get_input_embeddings().weight
        if args.enabled and args.contrastive_queue_size:
            validate_queue_usage(
                text_requires_grad=args.contrastive_text_source == "input_embeds" and weight.requires_grad,
                has_text_head=args.contrastive_head != "none")
        self.contrastive_args = args
        head = ContrastiveHead(args, self._contrastive_hidden_size())
        # inside from_pretrained the model may be built on meta: the head stays there and is
        # materialised from the checkpoint's weights
        self.contrastive_head = head if weight.device.type == "meta" else head.to(weight.device)
        self.config.contrastive = args.to_dict()
        self._prompt_ids = None
        if tokenizer is not None:
            tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor is fine too
            self._separator_ids = whitespace_token_ids(tokenizer)
            if args.contrastive_text_source == "llm":
                prefix, suffix = split_template(args.contrastive_prompt)
                self._prompt_ids = (
                    tokenizer(prefix, add_special_tokens=False).input_ids if prefix else [],
                    tokenizer(suffix, add_special_tokens=False).input_ids if suffix else [],
                    tokenizer.bos_token_id)
                if args.enabled and args.contrastive_text_cache:
                    self._text_cache = None
                    self.text_cache()  # open now: a cache built for other settings is refused before training

    def _text_embeddings(self, ids: torch.Tensor, caption_mask: torch.Tensor) -> torch.Tensor:
        """One text embedding per caption: pooled frozen input embeddings, or (``--contrastive_text_source
        llm``) pooled hidden states of a no-grad text-only pass over the prompted caption, read from
        ``--contrastive_text_cache`` when given (missing captions computed by that pass and appended)."""
        args = self.contrastive_args
        embed = self.get_input_embeddings()
        if args.contrastive_text_source == "input_embeds":
            with torch.set_grad_enabled(torch.is_grad_enabled() and embed.weight.requires_grad):
                return pool(embed(ids.clamp(min=0)), caption_mask, args.text_pooling)
        if args.contrastive_text_cache:
            return self._cached_text_embeddings(ids, caption_mask)
        return self._live_text_embeddings(ids, caption_mask)

    def _live_text_embeddings(self, ids: torch.Tensor, caption_mask: torch.Tensor) -> torch.Tensor:
        """The prompted text-only pass of the frozen LLM (no grad), pooled at --contrastive_text_layer."""
        args = self.contrastive_args
        if self._prompt_ids is None:
            raise RuntimeError("--contrastive_text_source llm needs the tokenizer: call "
                               "model.init_contrastive(args, tokenizer) (the trainer does this)")
        prompt_ids, prompt_mask = build_prompt_batch(ids, caption_mask, *self._prompt_ids)
        with torch.no_grad():
            out = self._text_decoder()(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=False,
                                       output_hidden_states=args.contrastive_text_layer != -1, return_dict=True)
            states = out.last_hidden_state if args.contrastive_text_layer == -1 \
                else out.hidden_states[args.contrastive_text_layer]
            return pool(states, prompt_mask.bool(), args.text_pooling)

    def text_cache(self) -> TextEmbeddingCache:
        """The open ``--contrastive_text_cache`` of the current settings (opened, and its identity checked,
        on first use; this process appends to part ``r<rank>``)."""
        args = self.contrastive_args
        cache = getattr(self, "_text_cache", None)
        if cache is not None and cache.directory == os.path.abspath(args.contrastive_text_cache) \
                and getattr(self, "_text_cache_args", None) is args:
            return cache
        if self._prompt_ids is None:
            raise RuntimeError("--contrastive_text_cache needs the tokenizer: call model.init_contrastive(args, tokenizer)")
        weight = self.get_input_embeddings().weight
        identity = cache_identity(
            fingerprint=model_fingerprint(self._text_decoder(), gathered=zero3_gathered), text_layer=args.contrastive_text_layer,
            pooling=args.text_pooling, template=resolve_template(args.contrastive_prompt),
            prompt_ids=self._prompt_ids, dim=tuple(getattr(weight, "ds_shape", weight.shape))[1], dtype=weight.dtype)
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
        self._text_cache = TextEmbeddingCache(args.contrastive_text_cache, identity, writer=f"r{rank}")
        self._text_cache_args = args
        logger.info("text cache %s: %d captions cached", self._text_cache.directory, len(self._text_cache))
        return self._text_cache

    def _cached_text_embeddings(self, ids: torch.Tensor, caption_mask: torch.Tensor) -> torch.Tensor:
        """Rows of the text cache by caption key; missing captions (each distinct one once) run the live
        pass and are appended, so nothing is ever returned as a placeholder."""
        cache = self.text_cache()
        keys = caption_keys(ids, caption_mask)
        found, rows = cache.lookup(keys)
        out = torch.empty(ids.shape[0], cache.dim, dtype=cache.dtype, device=ids.device)
        if bool(found.any()):
            out[found.to(ids.device)] = rows.to(ids.device)
        missing = torch.nonzero(~found).flatten()
        if missing.numel():
            miss_keys = keys.cpu()[missing]
            uniq, inverse = torch.unique(miss_keys, return_inverse=True)
            first = torch.zeros(uniq.numel(), dtype=torch.long).scatter_reduce(
                0, inverse, missing, reduce="amin", include_self=False)  # one row per distinct caption
            rows_dev = first.to(ids.device)
            fresh = self._live_text_embeddings(ids[rows_dev], caption_mask[rows_dev]).to(cache.dtype)
            cache.append(uniq, fresh)
            out[missing.to(ids.device)] = fresh[inverse.to(ids.device)]
        return out

    def fill_text_cache(self, captions, *, batch_size: int = 64,
                        progress: Optional[Callable[[int], None]] = None) -> Tuple[int, int]:
        """Precompute: cache the distinct captions (token ids as the plain template yields them) this
        rank's shard lacks (``captions``: token-id lists, or ``unique_captions``' {key: ids}).
        Returns (distinct captions, rows computed here)."""
        unique = captions if isinstance(captions, dict) else unique_captions(captions, caption_keys)
        rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) \
            if torch.distributed.is_available() and torch.distributed.is_initialized() else (0, 1)
        computed = fill_cache(self.text_cache(), unique, self._live_text_embeddings, batch_size=batch_size,
                              rank=rank, world=world, device=self.get_input_embeddings().weight.device,
                              progress=progress)
        return len(unique), computed


# ---- trainer ----------------------------------------------------------------------------------------
class ClampLogitScale(TrainerCallback):
    """Keeps the logit scale under its cap after each optimizer step."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            clamp_logit_scale(model)


class ContrastiveTrainerMixin:
    """Joint-loss bookkeeping for a transformers Trainer subclass. The host calls
    ``_setup_contrastive`` after ``Trainer.__init__`` and defines ``_saves_trainable_only`` (stage 1)
    and ``_load_stage1_weights(model, directory)``."""

    _saves_trainable_only = True

    def _setup_contrastive(self, contrastive_args: ContrastiveArguments, nonfinite_max_skips: int = 0,
                           elastic_data_order: bool = False) -> None:
        self.contrastive_args = contrastive_args
        self._elastic_order = bool(elastic_data_order)
        self._elastic_resume = False
        self._contrastive_model = find_contrastive_model(self.model) if contrastive_args.enabled else None
        self._stats = JointLossStats()
        self.nonfinite_guard = NonFiniteGuard(int(nonfinite_max_skips))
        self._skipped_terms = 0
        if self._contrastive_model is not None:
            self.add_callback(ClampLogitScale())

    def _load_stage1_weights(self, model, directory: str) -> None:
        raise NotImplementedError

    # ---- optimisation ---------------------------------------------------------------------------
    def create_optimizer(self, *args, **kwargs):
        head_params: List[torch.nn.Parameter] = []
        if self.optimizer is None and self._contrastive_model is not None:
            head_params = self._contrastive_model.contrastive_head.trainable_parameters()
        lr = self.contrastive_args.contrastive_lr or self.args.learning_rate
        self.optimizer = optimizer_with_head_group(lambda: super(ContrastiveTrainerMixin, self).create_optimizer(
            *args, **kwargs), head_params, lr)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        bad_records = inputs.pop(BAD_RECORDS_KEY, None) or []
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        if model.training:
            if fault_step("nonfinite_loss") == self.state.global_step + 1:
                loss = loss * float("nan")  # test hook (training/faults.py)
            loss = self._guard_step(model, loss, outputs, bad_records)
            if getattr(outputs, "contrastive_loss", None) is not None:
                self._stats.add(outputs)
        return (loss, outputs) if return_outputs else loss

    def _guard_step(self, model, loss, outputs, bad_records=()):
        """One all-reduce per micro-batch (training/step_guard.py): a record that failed to load on any
        rank (--data_check_policy error) makes every rank raise DataCheckError at this step (train()
        saves a checkpoint first); a non-finite loss / logit scale on any rank stops the run, or within
        --nonfinite_max_skips gives this micro-batch a zero gradient on every rank."""
        scale = getattr(outputs, "logit_scale", None)
        rows = getattr(outputs, "contrastive_rows", None)
        verdict = agree_on_step(loss, scale, len(bad_records), rows)
        if rows is not None and self._contrastive_model is not None:
            pairs = verdict.global_rows if (verdict.distributed and self.contrastive_args.contrastive_gather) \
                else float(rows)
            self._count_skipped_term(pairs)
        step = self.state.global_step + 1
        raise_bad_records(verdict, step, bad_records)
        values = {"loss": loss.detach(), "ntp_loss": getattr(outputs, "ntp_loss", None),
                  "contrastive_loss": getattr(outputs, "contrastive_loss", None), "logit_scale": scale}
        if not self.nonfinite_guard.check(verdict, step, values, self.args.output_dir):
            return loss
        return zero_loss(model.parameters())

    def _count_skipped_term(self, pairs: float) -> None:
        """A micro-batch whose global batch holds fewer than 2 image-caption pairs has no negatives:
        the contrastive term is zero there (decided on all ranks together). Counted, logged."""
        queue = self._contrastive_model.contrastive_head.queue
        if pairs >= 2 or (queue is not None and int(queue.filled) > 0 and pairs >= 1):
            return
        self._skipped_terms += 1
        if self._skipped_terms in (1, 10, 100) or self._skipped_terms % 1000 == 0:
            logger.warning("contrastive term skipped at step %d: %d image-caption pair(s) in the global batch, no "
                           "negatives (%d such micro-batches so far)", self.state.global_step + 1, int(pairs),
                           self._skipped_terms)

    # ---- logs -----------------------------------------------------------------------------------
    def log(self, logs: Dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            logs.update(self._pop_logs())
        super().log(logs, *args, **kwargs)

    def _pop_logs(self) -> Dict[str, float]:
        """Means since the last log, summed over ranks (every rank logs at the same step), and the
        reliability counters (records replaced during training on all ranks, skipped steps)."""
        runtime_skips = float(getattr(self.train_dataset, "runtime_skips", 0) or 0)
        s = self._stats.pop(self.args.device, extra={"runtime_skips": runtime_skips})
        out: Dict[str, float] = {}
        if s["runtime_skips"]:
            out["runtime_skipped_records"] = int(s["runtime_skips"])
        if self.nonfinite_guard.count:
            out["nonfinite_skipped_total"] = self.nonfinite_guard.count
        if self._contrastive_model is None:
            return out
        head = self._contrastive_model.contrastive_head
        means = joint_loss_means(s, head)
        if means:
            rows_per_step = s["rows"] / s["steps"]  # per rank and micro-batch
            global_rows = rows_per_step * (s["world"] if self.contrastive_args.contrastive_gather else 1)
            queued = int(head.queue.filled) if head.queue is not None else 0
            means["negatives"] = round(max(global_rows - 1, 0) + queued, 2)
        out.update(means)
        if self._skipped_terms:
            out["contrastive_skipped_total"] = self._skipped_terms
        return out

    # ---- data order ------------------------------------------------------------------------------
    def _get_train_sampler(self, *args, **kwargs):
        """``--elastic_data_order True``: a permutation from the seed and the epoch only, the same for
        any number of ranks (training/elastic.py); otherwise the host's sampler."""
        if not self._elastic_order:
            return super()._get_train_sampler(*args, **kwargs)
        dataset = args[0] if args and args[0] is not None else self.train_dataset
        if getattr(self.args, "group_by_modality_length", False) or getattr(self.args, "group_by_length", False):
            raise ValueError("--elastic_data_order True orders the data by --seed alone; it cannot be combined with "
                             "--group_by_modality_length / --group_by_length (their order depends on the world size)")
        seed = self.args.data_seed if getattr(self.args, "data_seed", None) is not None else self.args.seed
        return elastic.SeededOrderSampler(len(dataset), seed)

    # ---- checkpoints ----------------------------------------------------------------------------
    def _run_shape(self) -> elastic.RunShape:
        cfg = getattr(self.args, "hf_deepspeed_config", None) if self.is_deepspeed_enabled else None
        stage = int(cfg.config.get("zero_optimization", {}).get("stage", 0)) if cfg is not None else None
        return elastic.RunShape(self.args.world_size, self.args.per_device_train_batch_size,
                                self.args.gradient_accumulation_steps, self._elastic_order, stage)

    def _save_optimizer_and_scheduler(self, output_dir):
        if fault_step("kill_in_save") == self.state.global_step:
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: die with the checkpoint half-written
        enabled = self.is_deepspeed_enabled and self._saves_trainable_only
        with trainable_only_engine_save(self.model_wrapped, enabled=enabled):
            result = super()._save_optimizer_and_scheduler(output_dir)
        # the world-size-independent part: how the run was split, and (stage 1) the trainable state by
        # name (a collective under ZeRO-2/3)
        state = elastic.gather_named_state(self.model.named_parameters(), self._engine_optimizer(),
                                           self.state.global_step) if self._saves_trainable_only else None
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            if state is not None:
                atomic_torch_save(state, os.path.join(output_dir, elastic.STATE_FILE))
            elastic.write_shape(output_dir, self._run_shape())
        return result

    def _engine_optimizer(self):
        """The optimizer that holds the state: DeepSpeed's ZeRO optimizer, else the Trainer's."""
        return self.model_wrapped.optimizer if self.is_deepspeed_enabled else self.optimizer

    def _plan_elastic_resume(self, checkpoint: str) -> bool:
        """Whether ``checkpoint`` was written with another split of the global batch (ranks, DeepSpeed
        stage); logs what carries over; ValueError when it cannot continue as the same run."""
        gathered = self._contrastive_model is not None and self.contrastive_args.contrastive_gather
        saved = elastic.read_shape(checkpoint)
        cross, notes = elastic.resume_plan(saved, self._run_shape(), checkpoint, gathered)
        if cross and not os.path.isfile(os.path.join(checkpoint, elastic.STATE_FILE)):
            raise ValueError(f"{checkpoint} holds no world-size-independent state ({elastic.STATE_FILE}: stage-1 "
                             f"checkpoints only); resume it as it was written: {saved.describe() if saved else ''}")
        if self.args.should_log:
            for note in notes:
                logger.warning("%s", note)
        return cross

    def _restore_elastic_state(self, checkpoint: str, module, optimizer) -> None:
        """Trainable weights and Adam moments from the world-size-independent state, and the head's
        buffers (the text queue) from its file."""
        path = os.path.join(checkpoint, elastic.STATE_FILE)
        state = torch.load(path, map_location="cpu", weights_only=True)
        n = elastic.restore_named_state(module.named_parameters(), optimizer, state, path)
        target = find_contrastive_model(module)
        buffers = load_head_buffers(target, checkpoint) if target is not None else 0
        logger.info("restored %d trainable tensors and their Adam moments (step %d) from %s, %d head buffer(s)", n,
                    state["step"], path, buffers)

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None:
            return None
        plain = not self.is_deepspeed_enabled and not getattr(self, "is_fsdp_enabled", False)
        if self._elastic_resume:
            if plain:  # DeepSpeed: restored by deepspeed_nonstrict_resume, before this call
                self._restore_elastic_state(checkpoint, self.model, self.optimizer)
            self._load_scheduler(checkpoint)
            # the optimizer's current learning rates are part of its own state file, not of the
            # scheduler's: the step after the resume runs at the scheduled rate
            for group, lr in zip(self.optimizer.param_groups, self.lr_scheduler.get_last_lr()):
                group["lr"] = lr
            return None
        if plain and self.args.world_size > 1 and self.args.device.type == "cpu":
            # CPU ranks: transformers 4.37 maps the optimizer file to args.device ("cpu:0"), which
            # torch.load cannot restore; the same files, mapped to "cpu"
            self.optimizer.load_state_dict(torch.load(os.path.join(checkpoint, "optimizer.pt"), map_location="cpu",
                                                      weights_only=True))
            return self._load_scheduler(checkpoint)
        return super()._load_optimizer_and_scheduler(checkpoint)

    def _load_scheduler(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, "scheduler.pt")
        if os.path.isfile(path):
            self.lr_scheduler.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self._saves_trainable_only and os.path.isfile(os.path.join(resume_from_checkpoint, PROJECTOR_FILE)):
            target = find_contrastive_model(model if model is not None else self.model) or self.model
            logger.info("resuming stage-1 weights (projector, head) from %s", resume_from_checkpoint)
            self._load_stage1_weights(target, resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    # transformers 4.37 writes into an existing non-empty checkpoint-N in place (no staging); a host
    # whose _save_checkpoint always stages (the native host) sets this to False
    _overwrites_existing_checkpoint = True

    def _guarded_checkpoint_save(self, save: Callable[[], object], trial=None):
        """Run the host's checkpoint save ``save()``. An OSError (a full disk, a failing write) stops the
        run with CheckpointSaveError naming the path, the free and the needed space; the incomplete
        save is removed and the earlier checkpoints stay as they were. Test hook: ``enospc_in_save@N``."""
        final = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        in_place = self._overwrites_existing_checkpoint and os.path.isdir(final) and bool(os.listdir(final))
        hook = failing_torch_save() if fault_step("enospc_in_save") == self.state.global_step \
            else contextlib.nullcontext()
        try:
            with hook:
                return save()
        except OSError as err:
            raise self._save_failed(err, final, in_place) from err

    def _save_failed(self, err: OSError, final: str, in_place: bool) -> CheckpointSaveError:
        staging = staging_dir(final)
        incomplete = [p for p in (staging, final if in_place else None) if p and os.path.isdir(p)]
        written = sum(dir_bytes(p) for p in incomplete)
        for path in incomplete:  # a partial save, or a checkpoint-N half overwritten in place
            shutil.rmtree(path, ignore_errors=True)
        earlier = [p for p in checkpoint_dirs(os.path.dirname(final))
                   if p != final and (checkpoint_step(p) or 0) < self.state.global_step]
        previous = earlier[-1] if earlier else None
        needed, needed_from = (dir_bytes(previous), f"the size of {os.path.basename(previous)}") if previous \
            else (written, "at least what was written before the failure")
        free = free_bytes(final)
        message = save_failure_message(err, final, needed=needed, needed_from=needed_from, free=free,
                                       previous=previous)
        logger.error("%s", message)
        return CheckpointSaveError(message, path=final, needed=needed, free=free)

    def _seal_checkpoint(self, directory: str) -> None:
        """Write the manifest of a checkpoint that is complete on disk (every rank wrote its part):
        main process, last file of the checkpoint. It becomes the last verified checkpoint."""
        write_manifest(directory)
        self._verified_checkpoint = directory

    def _rotate_checkpoints(self, use_mtime=False, output_dir=None) -> None:
        """transformers 4.37's ``_save_checkpoint`` calls this on the main process right after it renamed
        tmp-checkpoint-N to checkpoint-N: seal checkpoint-N with its manifest, then rotate."""
        run_dir = output_dir or self.args.output_dir
        newest = os.path.join(run_dir, f"checkpoint-{self.state.global_step}")
        if is_complete_checkpoint(newest):
            self._seal_checkpoint(newest)
        self._rotate_keeping_verified(run_dir)

    def _rotate_keeping_verified(self, run_dir: str) -> None:
        """``save_total_limit``: delete the oldest checkpoints, never the newest, the last verified one
        or the best model checkpoint (training/checkpointing.py: rotation_victims)."""
        protected = (getattr(self, "_verified_checkpoint", None), self.state.best_model_checkpoint)
        for path in rotation_victims(checkpoint_dirs(run_dir), self.args.save_total_limit, protected):
            logger.info("deleting older checkpoint %s (--save_total_limit %s)", path, self.args.save_total_limit)
            shutil.rmtree(path, ignore_errors=True)

    def _resolve_resume(self, resume_from_checkpoint, required: bool = False) -> Optional[str]:
        """The checkpoint to resume from: for True, the newest checkpoint in output_dir that verifies
        against its manifest (a damaged newer one is reported and skipped; none: step 0, or ValueError
        when ``required``); for a path, the path if it verifies (else ValueError naming the reason).
        Decided on the main process and broadcast, so every rank resumes from the same checkpoint."""
        if not resume_from_checkpoint:
            return None
        out = self.args.output_dir
        if resume_from_checkpoint is True:
            def decide() -> Tuple[Optional[str], Optional[str]]:
                found = last_complete_checkpoint(out)
                if found is None and checkpoint_dirs(out):
                    logger.warning("no intact checkpoint in %s: training starts from step 0", out)
                return found, None
        else:
            path = str(resume_from_checkpoint)

            def decide() -> Tuple[Optional[str], Optional[str]]:
                return path, verify_checkpoint(path)
        found, problem = _decided_on_main(decide, self.args)
        if problem:
            raise ValueError(f"--resume_from_checkpoint {resume_from_checkpoint}: not a usable checkpoint ({problem}); "
                             "resume from another checkpoint-* or start without --resume_from_checkpoint")
        if found is None and required:
            raise ValueError(f"no intact checkpoint-* in {out} to resume from")
        self._verified_checkpoint = found
        self._elastic_resume = self._plan_elastic_resume(found) if found else False
        return found

    def _train_guarded(self, train: Callable[[], object]):
        """``train()`` after removing what interrupted saves left; DeepSpeed resumes load the module
        non-strictly (its checkpoints hold no frozen weights). A DataCheckError that every rank raised
        at the same step saves a resumable checkpoint first; one of a single rank (e.g. too many
        runtime skips) cannot enter a collective save the others never reach: it only stops."""
        if self.args.should_save:
            clean_incomplete_checkpoints(self.args.output_dir)
        self.accelerator.wait_for_everyone()
        nonstrict = self._saves_trainable_only and self.is_deepspeed_enabled
        with deepspeed_nonstrict_resume(self) if nonstrict else contextlib.nullcontext():
            try:
                return train()
            except DataCheckError as err:
                if getattr(err, "agreed", False) or self.args.world_size == 1:
                    logger.error("saving a resumable checkpoint at step %d before stopping", self.state.global_step)
                    self._save_checkpoint(self.model, trial=None)
                raise


def _decided_on_main(decide: Callable[[], tuple], args) -> tuple:
    """``decide()`` on the main process, its result broadcast to every rank (one process: just call)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return decide()
    box = [decide() if args.process_index == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def zero3_gathered(param: torch.Tensor):
    """A context in which a parameter partitioned by DeepSpeed ZeRO-3 is whole, for reading (a collective)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters([param], modifier_rank=None)


@contextlib.contextmanager
def trainable_only_engine_save(engine, enabled: bool = True):
    """Make ``engine.save_checkpoint`` skip frozen parameters (the LLM would be GBs per checkpoint)."""
    if not enabled or engine is None or not hasattr(engine, "save_checkpoint") or \
            "exclude_frozen_parameters" not in inspect.signature(engine.save_checkpoint).parameters:
        yield
        return
    original = engine.save_checkpoint

    def save_trainable_only(*args, **kwargs):
        kwargs["exclude_frozen_parameters"] = True
        return original(*args, **kwargs)

    engine.save_checkpoint = save_trainable_only
    try:
        yield
    finally:
        del engine.save_checkpoint  # back to the class method


@contextlib.contextmanager
def deepspeed_nonstrict_resume(trainer=None):
    """The engine checkpoint holds no frozen parameters, so the Trainer's DeepSpeed resume must load
    the module non-strictly (transformers does so only for PEFT models; 4.37's loader has no flag for
    it, hence the engine call here). The frozen weights stay as ``from_pretrained`` loaded them. A
    checkpoint written on another world size or DeepSpeed stage (``trainer._elastic_resume``) is
    restored from its world-size-independent state instead of the engine's partitioned files."""
    import transformers.trainer as hf_trainer

    original = hf_trainer.deepspeed_load_checkpoint

    def load(engine, checkpoint_path, *args, **kwargs):
        if trainer is not None and trainer._elastic_resume:
            trainer._restore_elastic_state(checkpoint_path, engine.module, engine.optimizer)
            return
        if not glob.glob(os.path.join(checkpoint_path, "global_step*")):
            raise ValueError(f"{checkpoint_path}: no DeepSpeed checkpoint (global_step*) in it; it was not written "
                             "by a --deepspeed run (resume it without --deepspeed, or start a new output_dir)")
        load_path, _ = engine.load_checkpoint(checkpoint_path, load_module_strict=False, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if load_path is None:
            raise ValueError(f"[deepspeed] failed to resume from checkpoint {checkpoint_path}")

    hf_trainer.deepspeed_load_checkpoint = load
    try:
        yield
    finally:
        hf_trainer.deepspeed_load_checkpoint = original
