"""Resuming a stage-1 run on another number of ranks (host-agnostic; no ``llava`` import).

What "the same run" means after a resume on another world size (README, "Reliability"):

* the global batch (ranks x per-device batch x gradient accumulation) is the same: a checkpoint
  resumed with another global batch is refused, naming the per-device batch that keeps it;
* the data order is a function of ``--seed`` (``--data_seed``) and the epoch only
  (``--elastic_data_order True``: ``SeededOrderSampler``), so optimizer step *s* trains on samples
  ``s*G .. s*G+G-1`` of the epoch's permutation whatever the world size: no sample is seen twice or
  skipped within the epoch. Without the flag the data order of the resumed epoch differs (warned);
* the trainable state (projector, head) and the optimizer moments carry over exactly: every stage-1
  checkpoint holds them by parameter name (``elastic_optimizer.pt``, gathered under ZeRO-2/3), and
  ``run_shape.json`` records the world size that wrote it.

Per-step losses then equal the uninterrupted run's when every micro-batch is the same: the same
per-device batch, ranks x accumulation unchanged (a rank's micro-batch becomes an accumulation
micro-batch), and InfoNCE negatives per micro-batch (``--contrastive_gather False``, or NTP-only). With
another per-device batch the NTP token means change; with gathered negatives the InfoNCE term of a
step spans the ranks, so it changes with them (both warned).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import torch

from llava_contrastive.training.preflight import global_batch_fix

SHAPE_FILE = "run_shape.json"
STATE_FILE = "elastic_optimizer.pt"
MOMENTS = ("exp_avg", "exp_avg_sq")
ELASTIC_HELP = ("data order from --seed (--data_seed) and the epoch only, not from the number of ranks, so a stage-1 "
                "run resumes on another world size with the same samples at every step (scripts/pretrain_contrastive.sh "
                "sets it); off: transformers' sampler, as upstream")


@dataclass
class ElasticArguments:
    elastic_data_order: bool = field(default=False, metadata={"help": ELASTIC_HELP})


@dataclass(frozen=True)
class RunShape:
    """How a run splits its global batch over ranks."""

    world_size: int
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    elastic_data_order: bool = False
    deepspeed_stage: Optional[int] = None

    @property
    def global_batch(self) -> int:
        return self.world_size * self.per_device_train_batch_size * self.gradient_accumulation_steps

    @property
    def contrastive_batch(self) -> int:
        return self.world_size * self.per_device_train_batch_size

    def describe(self) -> str:
        ds = f", ZeRO-{self.deepspeed_stage}" if self.deepspeed_stage is not None else ", no DeepSpeed"
        return (f"{self.world_size} rank(s) x {self.per_device_train_batch_size} per device x "
                f"{self.gradient_accumulation_steps} accumulation = global batch {self.global_batch}{ds}")


def write_shape(directory: str, shape: RunShape) -> None:
    from llava_contrastive.core.files import atomic_write_json

    atomic_write_json(os.path.join(directory, SHAPE_FILE), asdict(shape), indent=1, sort_keys=True)


def read_shape(directory: str) -> Optional[RunShape]:
    path = os.path.join(directory, SHAPE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    return RunShape(**{k: raw[k] for k in RunShape.__dataclass_fields__ if k in raw})


def resume_plan(saved: Optional[RunShape], now: RunShape, checkpoint: str, gathered_negatives: bool = False
                ) -> Tuple[bool, List[str]]:
    """Whether resuming ``checkpoint`` (written with ``saved``) under ``now`` needs the
    world-size-independent state, and the warnings to log. ValueError when it cannot be the same run.
    ``gathered_negatives``: the InfoNCE term takes its negatives from all ranks (--contrastive_gather)."""
    if saved is None:  # written before run_shape.json existed: only a same-shape resume is known to work
        return False, []
    if (saved.world_size, saved.deepspeed_stage, saved.global_batch) == \
            (now.world_size, now.deepspeed_stage, now.global_batch):
        return False, []
    if saved.global_batch != now.global_batch:
        fix = global_batch_fix(saved.global_batch, now.world_size, now.gradient_accumulation_steps)
        raise ValueError(f"{checkpoint} was written by {saved.describe()}; this run has {now.describe()}. Resuming "
                         f"needs the same global batch: use {fix}, or start a new --output_dir")
    notes = [f"resuming {checkpoint} (written by {saved.describe()}) on {now.describe()}: projector, head, optimizer "
             "moments and schedule carry over from its world-size-independent state; every step trains on the "
             "same samples" + ("" if saved.elastic_data_order and now.elastic_data_order else " from the next epoch on")]
    if not (saved.elastic_data_order and now.elastic_data_order):
        notes.append("the data order of the resumed epoch differs from the uninterrupted run (the run did not use "
                     "--elastic_data_order True on both sides): some samples of this epoch may be seen twice or not "
                     "at all; later epochs are new permutations either way")
    if saved.per_device_train_batch_size != now.per_device_train_batch_size:
        notes.append(f"the per-device batch changes from {saved.per_device_train_batch_size} to "
                     f"{now.per_device_train_batch_size}: the micro-batches differ, so the losses differ slightly from "
                     "the uninterrupted run's (the NTP loss is a token mean per micro-batch, as upstream's)")
    elif gathered_negatives and saved.contrastive_batch != now.contrastive_batch:
        notes.append(f"InfoNCE negatives are gathered over the ranks: {now.contrastive_batch} pairs per term instead "
                     f"of {saved.contrastive_batch}, so the contrastive loss differs from the uninterrupted run's")
    return True, notes


class SeededOrderSampler(torch.utils.data.Sampler):
    """A permutation of ``range(n)`` that depends on ``seed + epoch`` only (not on ranks or the global
    RNG). The epoch is set by ``set_epoch`` when the loader passes it on, and otherwise counts the
    passes (transformers' resume iterates the loader once per skipped epoch)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self, epoch: int) -> List[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self.order(self.epoch)
        self.epoch += 1
        return iter(order)

    def __len__(self) -> int:
        return self.n


# ---- optimizer state by parameter name ------------------------------------------------------------
def _is_zero(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def gather_named_state(named_params: Iterable[Tuple[str, torch.nn.Parameter]], optimizer, step: int
                       ) -> Dict[str, object]:
    """``{"step": int, "params": {name: {"weight", "exp_avg", "exp_avg_sq"}}}`` for the trainable
    parameters, full tensors on CPU. Under DeepSpeed ZeRO-2/3 the partitions are gathered with
    DeepSpeed's ``safe_get_full_*`` (a collective: every rank calls it). Adam-family moments only."""
    out: Dict[str, Dict[str, torch.Tensor]] = {}
    named_params = list(named_params)
    if any(_is_zero(p) for _, p in named_params):
        _link_zero_states(optimizer, step, create=False)
    for name, p in named_params:
        if not p.requires_grad:
            continue
        if _is_zero(p):
            from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

            entry = {"weight": safe_get_full_fp32_param(p),
                     **{k: safe_get_full_optimizer_state(p, k) for k in MOMENTS}}
        else:
            state = optimizer.state.get(p, {})
            entry = {"weight": p.detach(), **{k: state.get(k) for k in MOMENTS}}
        if any(v is None for v in entry.values()):
            raise ValueError(f"{name}: no {', '.join(k for k, v in entry.items() if v is None)} in the optimizer "
                             "state (an Adam-family optimizer is needed for a world-size-independent checkpoint)")
        out[name] = {k: v.detach().cpu().clone() for k, v in entry.items()}  # as held (fp32 master under ZeRO)
    return {"step": int(step), "params": out}


def restore_named_state(named_params: Iterable[Tuple[str, torch.nn.Parameter]], optimizer,
                        state: Mapping[str, object], source: str) -> int:
    """Put the weights and Adam moments of ``state`` (``gather_named_state``) into the trainable
    parameters and ``optimizer`` (plain torch or DeepSpeed ZeRO-2/3; every rank calls it). Returns the
    number of parameters restored; ValueError when names or shapes do not match."""
    saved: Mapping[str, Mapping[str, torch.Tensor]] = state["params"]  # type: ignore[assignment]
    params = {n: p for n, p in named_params if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    if missing or unexpected:
        raise ValueError(f"{source}: trainable parameters do not match (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}); resume with the settings of the run that wrote it")
    for name, p in params.items():
        shape = tuple(saved[name]["weight"].shape)
        full = tuple(getattr(p, "ds_shape", p.shape))
        if shape != full:
            raise ValueError(f"{source}: {name} has shape {shape}, the model expects {full}")
    step = int(state["step"])
    zero = any(_is_zero(p) for p in params.values())
    if zero:
        _link_zero_states(optimizer, step, create=True)
    with torch.no_grad():
        for name, p in params.items():
            entry = saved[name]
            if hasattr(p, "ds_id"):
                for k in (None, *MOMENTS):
                    _set_zero3_partition(p, entry["weight" if k is None else k], k)
            elif _is_zero(p):
                from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

                safe_set_full_fp32_param(p, entry["weight"].to(p.device))
                for k in MOMENTS:
                    safe_set_full_optimizer_state(p, entry[k].to(p.device), k)
            else:
                p.copy_(entry["weight"].to(p.dtype))
                optimizer.state[p] = {"step": torch.tensor(float(step)),
                                      **{k: entry[k].to(device=p.device, dtype=p.dtype).clone() for k in MOMENTS}}
    if zero:
        _set_zero_step(optimizer, step)
    return len(params)


def _set_zero3_partition(param, value: torch.Tensor, key: Optional[str]) -> None:
    """This rank's slice of ``value`` into the fp32 master (``key`` None) or an Adam moment of a ZeRO-3
    parameter. DeepSpeed's ``safe_set_full_*`` reads past the end of a parameter smaller than its
    padded partitions (e.g. a 1-element logit scale on 2 ranks); the padding is left as it is here."""
    opt = param._z3_optimizer
    part, _ = opt._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    start = part.numel() * opt._get_param_partition_rank(param)
    mine = value.flatten()[start:start + part.numel()]
    part.data[:mine.numel()].copy_(mine.to(device=part.device, dtype=part.dtype))


def _link_zero_states(engine_optimizer, step: int, create: bool) -> None:
    """DeepSpeed's per-parameter views of its flat Adam states. ``create``: a fresh engine has none yet
    (Adam makes them at the first step), so zero states are made first. ZeRO-1/2 links the views once,
    after the first step of the first parameter group only, leaving the other groups' views empty: they
    are linked again here."""
    base = getattr(engine_optimizer, "optimizer", engine_optimizer)
    if create:
        flats = getattr(engine_optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO-3 sub-groups
        if flats is None:
            flats = [p for group in base.param_groups for p in group["params"]]
        for flat in flats:
            st = base.state[flat]
            if not st:
                st.update(step=torch.tensor(float(step)), exp_avg=torch.zeros_like(flat),
                          exp_avg_sq=torch.zeros_like(flat))
    if hasattr(engine_optimizer, "_lazy_init_hp_params_optimizer_state"):
        engine_optimizer._hp_optimizer_states_linked = False
        engine_optimizer._lazy_init_hp_params_optimizer_state()


def _set_zero_step(engine_optimizer, step: int) -> None:
    """DeepSpeed keeps one Adam state per flat fp32 partition: set its step count, then copy the fp32
    master partitions just set into the module's working weights."""
    base = getattr(engine_optimizer, "optimizer", engine_optimizer)
    for st in base.state.values():
        if "step" in st:
            st["step"] = torch.tensor(float(step)) if torch.is_tensor(st["step"]) else step
    if hasattr(engine_optimizer, "fp16_partitioned_groups_flat"):  # ZeRO-3: partitioned weights
        for low, fp32 in zip(engine_optimizer.fp16_partitioned_groups_flat,
                             engine_optimizer.fp32_partitioned_groups_flat):
            low.data.copy_(fp32.data)
    elif hasattr(engine_optimizer, "update_lp_params"):  # ZeRO-1/2 and the bf16 optimizer: copy and all-gather
        engine_optimizer.update_lp_params()
    else:
        raise ValueError(f"{type(engine_optimizer).__name__}: no known way to refresh the working weights from "
                         "the fp32 master copy; resume on the world size that wrote the checkpoint")
