"""Upstream LLaVA host (haotian-liu/LLaVA and forks; PyPI llava-torch).

Importing this package imports upstream modules directly (not through llava/model/__init__.py,
whose bare ``except`` hides real import errors) and registers the contrastive model with the
transformers Auto classes.
"""
from .model import ContrastiveLlavaConfig, ContrastiveLlavaForCausalLM  # noqa: F401
from .trainer import ContrastiveLLaVATrainer  # noqa: F401
