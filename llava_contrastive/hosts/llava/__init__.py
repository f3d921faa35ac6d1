"""Upstream LLaVA host (haotian-liu/LLaVA and forks; PyPI llava-torch).

The model module imports upstream modules directly (not through llava/model/__init__.py, whose bare
``except`` hides real import errors) and registers the contrastive model with the transformers Auto
classes. Importing this package itself is cheap: the classes load on first use, so an entry point's
pre-flight checks run before torch, transformers and llava are imported.
"""
from __future__ import annotations

import importlib

_LAZY = {"ContrastiveLlavaConfig": "model", "ContrastiveLlavaForCausalLM": "model",
         "ContrastiveLlavaMistralConfig": "model", "ContrastiveLlavaMistralForCausalLM": "model",
         "ContrastiveLlavaAutoForCausalLM": "model", "ContrastiveLLaVATrainer": "trainer"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
