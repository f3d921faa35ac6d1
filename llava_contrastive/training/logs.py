"""The joint loss's training logs, shared by both hosts' trainers (pure torch, no transformers).

Every micro-batch adds its ``ntp_loss``, ``contrastive_loss``, pair count and in-batch accuracies;
at a logging step the sums since the last one are reduced over ranks in one all-reduce (hosts'
own counters ride along in ``extra``) and turned into means."""
from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch
import torch.distributed as dist

STAT_KEYS = ("ntp_loss", "contrastive_loss", "steps", "rows", "i2t_hits", "t2i_hits", "acc_rows")


class JointLossStats:
    def __init__(self) -> None:
        self._sums: Dict[str, torch.Tensor] = {}

    def add(self, out) -> None:
        """One micro-batch's model output (``ntp_loss``, ``contrastive_loss``, ``contrastive_rows``,
        ``i2t_accuracy`` / ``t2i_accuracy`` or None)."""
        rows = out.contrastive_rows
        zero = torch.zeros_like(rows)
        acc_rows = rows if out.i2t_accuracy is not None else zero
        values = {"ntp_loss": out.ntp_loss.float(), "contrastive_loss": out.contrastive_loss.float(),
                  "steps": torch.ones_like(rows), "rows": rows,
                  "i2t_hits": (out.i2t_accuracy if out.i2t_accuracy is not None else zero) * acc_rows,
                  "t2i_hits": (out.t2i_accuracy if out.t2i_accuracy is not None else zero) * acc_rows,
                  "acc_rows": acc_rows}
        for k, v in values.items():
            self._sums[k] = self._sums.get(k, 0) + v.detach().float()

    def pop(self, device, extra: Optional[Mapping[str, float]] = None) -> Dict[str, float]:
        """Sums since the last call over all ranks (collective: every rank calls it at the same
        step), ``extra`` summed too, and ``world``. Resets the sums."""
        extra = dict(extra or {})
        names = STAT_KEYS + tuple(extra)
        vec = torch.stack([torch.as_tensor(self._sums.get(k, 0.0), dtype=torch.float32, device=device)
                           for k in STAT_KEYS]
                          + [torch.tensor(float(v), dtype=torch.float32, device=device) for v in extra.values()])
        world = 1
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(vec)
            world = dist.get_world_size()
        self._sums = {}
        return {**dict(zip(names, vec.tolist())), "world": world}


def joint_loss_means(sums: Mapping[str, float], head) -> Dict[str, float]:
    """``ntp_loss``, ``contrastive_loss``, ``logit_scale`` and (when measured) ``i2t_acc`` /
    ``t2i_acc`` from ``JointLossStats.pop``; empty when no micro-batch was added."""
    if sums["steps"] == 0:
        return {}
    out = {"ntp_loss": round(sums["ntp_loss"] / sums["steps"], 6),
           "contrastive_loss": round(sums["contrastive_loss"] / sums["steps"], 6),
           "logit_scale": round(float(head.logit_scale().detach()), 4)}
    if sums["acc_rows"] > 0:
        out["i2t_acc"] = round(sums["i2t_hits"] / sums["acc_rows"], 4)
        out["t2i_acc"] = round(sums["t2i_hits"] / sums["acc_rows"], 4)
    return out
