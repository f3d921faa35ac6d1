"""Imports of the upstream host, with one clear error when it is missing."""
from __future__ import annotations

import importlib
from types import ModuleType

from llava_contrastive import HOST_INSTALL_HINT


class HostNotFoundError(ImportError):
    pass


def import_upstream(module: str) -> ModuleType:
    """Import ``llava.<module>`` directly; a missing host raises HostNotFoundError with the fix."""
    try:
        return importlib.import_module(f"llava.{module}")
    except ModuleNotFoundError as err:
        if err.name is not None and (err.name == "llava" or err.name.startswith("llava.")):
            raise HostNotFoundError(
                f"llava_contrastive needs the upstream LLaVA package (`llava`), which is not importable "
                f"({err}).\n{HOST_INSTALL_HINT}") from err
        raise


llava_llama = import_upstream("model.language_model.llava_llama")
llava_mistral = import_upstream("model.language_model.llava_mistral")
llava_trainer = import_upstream("train.llava_trainer")
constants = import_upstream("constants")

LlavaConfig = llava_llama.LlavaConfig
LlavaLlamaForCausalLM = llava_llama.LlavaLlamaForCausalLM
LlavaMistralConfig = llava_mistral.LlavaMistralConfig
LlavaMistralForCausalLM = llava_mistral.LlavaMistralForCausalLM
LLaVATrainer = llava_trainer.LLaVATrainer
IGNORE_INDEX: int = constants.IGNORE_INDEX
IMAGE_TOKEN_INDEX: int = constants.IMAGE_TOKEN_INDEX


def upstream_train_module() -> ModuleType:
    """``llava.train.train`` (imported on demand: it pulls in every model class of the host)."""
    return import_upstream("train.train")
