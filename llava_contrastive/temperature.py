"""Learnable (or fixed) logit scale and SigLIP bias.

All parameters of these modules (``log_scale``, ``bias``) are NO-DECAY: a trainer
must exclude them from weight decay (their names are listed in
``NO_DECAY_PARAM_NAMES``).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = [
    "NO_DECAY_PARAM_NAMES",
    "LogitScale",
    "SigLIPBias",
    "build_logit_params",
]

NO_DECAY_PARAM_NAMES: tuple[str, ...] = ("log_scale", "bias")

CLIP_INIT_TEMPERATURE = 0.07  # CLIP: scale 1/0.07
SIGLIP_INIT_TEMPERATURE = 0.1  # SigLIP: log scale init log(10)
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


def build_logit_params(
    loss: str,
    init_temperature: float | None = None,
    max_scale: float = 100.0,
    learnable: bool = True,
) -> nn.ModuleDict:
    """Logit parameters for ``loss`` ("infonce"/"clip" or "siglip").

    Returns a ModuleDict with "logit_scale" (LogitScale) and, for SigLIP, "logit_bias"
    (SigLIPBias). ``init_temperature`` None -> 0.07 for InfoNCE, 0.1 for SigLIP.
    All parameters are no-decay.
    """
    name = loss.lower().replace("-", "_")
    if name in ("infonce", "info_nce", "clip"):
        t = CLIP_INIT_TEMPERATURE if init_temperature is None else init_temperature
        return nn.ModuleDict({"logit_scale": LogitScale(t, max_scale, learnable)})
    if name == "siglip":
        t = SIGLIP_INIT_TEMPERATURE if init_temperature is None else init_temperature
        return nn.ModuleDict(
            {
                "logit_scale": LogitScale(t, max_scale, learnable),
                "logit_bias": SigLIPBias(SIGLIP_INIT_BIAS, learnable),
            }
        )
    raise ValueError(f"unknown contrastive loss {loss!r}; expected 'infonce' or 'siglip'")
