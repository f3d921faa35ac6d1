"""The per-step guard of a training run, shared by both hosts (no ``llava`` and no ``transformers``
import): one all-reduce per micro-batch lets every rank agree on

* a non-finite loss or logit scale (on any rank): the run stops naming the step and the values
  (``NonFiniteLossError``; nothing of that step is saved, so the last checkpoint stays intact), or,
  within ``--nonfinite_max_skips``, that micro-batch contributes a zero gradient (counted, logged);
* a record that failed to load during training under ``--data_check_policy error`` (on any rank,
  ``data_guard.BAD_RECORDS_KEY``): every rank raises ``DataCheckError`` at the same step, and the
  host saves a resumable checkpoint collectively before stopping;
* the number of image-caption pairs of the global batch (for the contrastive term's bookkeeping).

A host calls ``agree_on_step`` in its ``compute_loss`` after the forward, then
``raise_bad_records`` and ``NonFiniteGuard.check``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from llava_contrastive.data.check import DataCheckError

logger = logging.getLogger("llava_contrastive")

NONFINITE_HELP = (
    "non-finite loss or logit scale: the run stops naming the step and values, unless fewer than this many "
    "have occurred, in which case that micro-batch contributes a zero gradient (counted, logged)")


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class NonFiniteArguments:
    nonfinite_max_skips: int = field(default=0, metadata={"help": NONFINITE_HELP})


@dataclass
class StepVerdict:
    """What all ranks agreed on for one micro-batch."""
    nonfinite: bool  # a non-finite loss or logit scale on at least one rank
    bad_records: bool  # a record failed to load on at least one rank (policy error)
    global_rows: float  # contrastive pairs summed over ranks (local rows when not distributed)
    distributed: bool


def agree_on_step(loss: torch.Tensor, logit_scale: Optional[torch.Tensor] = None, n_bad_records: int = 0,
                  rows: Optional[torch.Tensor] = None) -> StepVerdict:
    """One all-reduce (sum) of [non-finite?, bad records, contrastive rows] over all ranks. Every rank
    must call it once per micro-batch, in the same order as its other collectives."""
    nonfinite = ~torch.isfinite(loss.detach().float())
    if logit_scale is not None:
        nonfinite = nonfinite | ~torch.isfinite(logit_scale.detach().float())
    flags = torch.stack([nonfinite.float().reshape(()),
                         torch.tensor(float(n_bad_records), device=nonfinite.device),
                         (rows if rows is not None else torch.zeros(())).detach().to(nonfinite.device).float()
                         .reshape(())])
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        dist.all_reduce(flags)  # sums: any non-finite, any bad record, global contrastive pairs
    return StepVerdict(nonfinite=bool(flags[0].item()), bad_records=bool(flags[1].item()),
                       global_rows=float(flags[2]), distributed=distributed)


def bad_records_error(step: int, bad_records: Sequence[str]) -> DataCheckError:
    """The error every rank raises when a record became unreadable at optimizer step ``step``.
    ``agreed = True``: raised on all ranks at the same step (the host may save collectively)."""
    where = "; ".join(bad_records) if bad_records else "on another rank (see its log)"
    err = DataCheckError(f"a training record became unreadable at optimizer step {step}: "
                         f"{where}. --data_check_policy error stops here (a resumable checkpoint is saved); "
                         "fix or remove the record, or use --data_check_policy skip, then re-run the command.")
    err.agreed = True
    return err


def raise_bad_records(verdict: StepVerdict, step: int, bad_records: Sequence[str]) -> None:
    if verdict.bad_records:
        raise bad_records_error(step, bad_records)


def format_values(values: Mapping[str, Optional[torch.Tensor]]) -> str:
    return ", ".join(f"{k}={float(v):.6g}" for k, v in values.items() if v is not None)


class NonFiniteGuard:
    """Counts agreed non-finite micro-batches against ``--nonfinite_max_skips``."""

    def __init__(self, max_skips: int = 0):
        self.max_skips = int(max_skips)
        self.count = 0

    def check(self, verdict: StepVerdict, step: int, values: Mapping[str, Optional[torch.Tensor]],
              output_dir: str) -> bool:
        """False: the step is finite everywhere. True: skip it (zero gradient, see ``zero_loss``).
        Raises ``NonFiniteLossError`` beyond the budget. ``values``: this rank's loss terms by name."""
        if not verdict.nonfinite:
            return False
        self.count += 1
        detail = format_values(values)
        if self.count > self.max_skips:
            raise NonFiniteLossError(
                f"non-finite loss at optimizer step {step} (on at least one rank; this rank: {detail}); "
                f"{self.count} so far, --nonfinite_max_skips {self.max_skips}. Nothing of this step was "
                f"saved: the last checkpoint in {output_dir} is intact. Lower --learning_rate or "
                f"--contrastive_max_logit_scale, check the data, then re-run the command to resume.")
        logger.warning("non-finite loss at step %d (%s): zero gradient for this micro-batch [%d/%d]",
                       step, detail, self.count, self.max_skips)
        return True


def zero_loss(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """A zero loss connected to every trainable parameter (each gets a zero gradient, so every rank
    runs the same backward and its gradient collectives)."""
    trainable = [p for p in parameters if p.requires_grad]
    return sum(p.sum() for p in trainable) * 0.0
