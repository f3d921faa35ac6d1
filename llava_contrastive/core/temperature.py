"""Learnable (or fixed) logit scale and SigLIP bias.

Their parameters (``log_scale``, ``bias``) take no weight decay: the trainers put the
whole head in its own no-decay group (``core.head.optimizer_with_head_group``).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["LogitScale", "SigLIPBias"]

CLIP_INIT_TEMPERATURE = 0.07  # CLIP: scale 1/0.07
SIGLIP_INIT_BIAS = -10.0  # SigLIP paper


class LogitScale(nn.Module):
    """Stores ``log_scale`` = log(1 / temperature); forward returns the multiplier
    exp(min(log_scale, log(max_scale))) as a scalar tensor.

    The clamp lives in forward so the cap holds even if the stored value is pushed
    above it (bf16 master weights, ZeRO); ``clamp_()`` additionally clamps the
    stored value in place after an optimizer step. With ``learnable=False`` the
    parameter is frozen (requires_grad False) but still saved in the state_dict.
    """

    def __init__(
        self,
        init_temperature: float = CLIP_INIT_TEMPERATURE,
        max_scale: float = 100.0,
        learnable: bool = True,
    ) -> None:
        super().__init__()
        if init_temperature <= 0 or max_scale <= 0:
            raise ValueError("init_temperature and max_scale must be > 0")
        self.max_scale = float(max_scale)
        self.log_max = math.log(self.max_scale)
        init = min(math.log(1.0 / init_temperature), self.log_max)
        # shape [1], not a 0-dim scalar: DeepSpeed's parameter broadcast cannot view a 0-dim tensor as bytes
        self.log_scale = nn.Parameter(torch.tensor([init], dtype=torch.float32), requires_grad=learnable)

    @property
    def learnable(self) -> bool:
        return self.log_scale.requires_grad

    def forward(self) -> Tensor:
        return self.log_scale.clamp(max=self.log_max).exp()[0]

    @torch.no_grad()
    def clamp_(self) -> None:
        """In-place clamp of the stored log scale (call after optimizer.step())."""
        self.log_scale.clamp_(max=self.log_max)

    def extra_repr(self) -> str:
        return f"max_scale={self.max_scale}, learnable={self.learnable}"


class SigLIPBias(nn.Module):
    """Scalar SigLIP logit bias ``bias`` (init -10); forward returns it."""

    def __init__(self, init_bias: float = SIGLIP_INIT_BIAS, learnable: bool = True) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([float(init_bias)]), requires_grad=learnable)  # [1]: see LogitScale

    def forward(self) -> Tensor:
        return self.bias[0]
