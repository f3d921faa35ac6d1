"""Upstream host's training entry: upstream `llava.train.train` with the contrastive model, trainer and flags.

Every flag of upstream's trainer works as before; `--contrastive_*` flags are added (see
llava_contrastive/core/config.py). Launch it as upstream does:
    python -m llava_contrastive.train ...            deepspeed llava_contrastive/train.py --deepspeed scripts/zero2.json ...
    deepspeed --module llava_contrastive.train ...   torchrun --nproc_per_node 8 -m llava_contrastive.train ...
Differences from upstream, all in the plugin: the RNG is seeded before the model is built (so two
runs with the same --seed are identical), stage-1 checkpoints are resumable, and the final save
on a CPU DeepSpeed run does not call torch.cuda.synchronize().
"""
from __future__ import annotations

import os
import sys

import argparse
import contextlib
import dataclasses
import logging

from llava_contrastive.core.config import ContrastiveArguments  # noqa: E402

logger = logging.getLogger("llava_contrastive")


def seed_from_argv(argv: list[str]) -> int:
    """Seed every RNG from `--seed` before anything is built (upstream seeds only in the
    Trainer, after its projector has been initialised)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--seed", type=int, default=42)
    seed = parser.parse_known_args(argv)[0].seed
    import transformers

    transformers.set_seed(seed)
    return seed


def make_training_arguments(upstream_cls):
    """Upstream's TrainingArguments with the contrastive flags merged in (upstream's `train()`
    builds its parser from the module global, so this is the class it must find there)."""

    def __post_init__(self):
        upstream_cls.__post_init__(self)
        ContrastiveArguments.from_object(self).validate()

    from llava_contrastive.hosts.llava.args import HostArguments
    from llava_contrastive.training.elastic import ElasticArguments

    extra = [(f.name, f.type, dataclasses.field(default=f.default, metadata=f.metadata))
             for cls in (ContrastiveArguments, HostArguments, ElasticArguments) for f in dataclasses.fields(cls)]
    cls = dataclasses.make_dataclass("ContrastiveTrainingArguments", extra, bases=(upstream_cls,),
                                     namespace={"__post_init__": __post_init__, "__module__": __name__})
    globals()[cls.__name__] = cls  # picklable: the Trainer saves training_args.bin (stage-2 saves)
    return cls


def make_data_arguments(upstream_cls):
    """Upstream's DataArguments with the --data_check* flags merged in."""
    from llava_contrastive.data.check import DataCheckArguments

    extra = [(f.name, f.type, dataclasses.field(default=f.default, metadata=f.metadata))
             for f in dataclasses.fields(DataCheckArguments)]
    return dataclasses.make_dataclass("DataArguments", extra, bases=(upstream_cls,))


def make_checked_data_module(original, argv: list[str]):
    """Upstream's make_supervised_data_module behind the data check (run once, on rank 0) and the
    runtime guard (see llava_contrastive/hosts/llava/data.py)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--output_dir", default=".")
    parser.add_argument("--vision_tower", default=None)
    parser.add_argument("--mm_vision_select_feature", default="patch")
    known = parser.parse_known_args(argv)[0]

    def make(tokenizer, data_args):
        from llava_contrastive.hosts.llava.data import make_checked_data_module as checked

        is_main = int(os.environ.get("RANK", "0") or 0) == 0
        return checked(original, tokenizer, data_args, known.output_dir, is_main,
                       image_tokens=_image_tokens(known.vision_tower, known.mm_vision_select_feature))

    return make


def _image_tokens(vision_tower: str | None, select_feature: str) -> int:
    """Tokens one image takes in the LLM sequence (0 when unknown): for the caption-length check."""
    if not vision_tower:
        return 0
    try:
        from transformers import CLIPVisionConfig

        cfg = CLIPVisionConfig.from_pretrained(vision_tower)
    except Exception:  # noqa: BLE001 - only a bound for a data check
        return 0
    return (cfg.image_size // cfg.patch_size) ** 2 + (1 if select_feature == "cls_patch" else 0)


def make_final_save(original):
    def save_final(trainer, output_dir: str) -> None:
        stage1 = getattr(trainer.args, "tune_mm_mlp_adapter", False)
        if stage1 or (trainer.deepspeed and not _cuda_available()):
            trainer.save_model(output_dir)
            return
        original(trainer, output_dir)

    return save_final


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def plugin_globals(namespace: dict, argv: list[str] | None = None) -> dict:
    """Replacements for upstream `llava.train.train` globals: the contrastive model, trainer,
    merged argument classes, the checked data module, and the final save (stage-1 head; no CUDA
    sync on CPU)."""
    from llava_contrastive.hosts.llava.model import ContrastiveLlavaAutoForCausalLM
    from llava_contrastive.hosts.llava.trainer import ContrastiveLLaVATrainer

    return {
        "LlavaLlamaForCausalLM": ContrastiveLlavaAutoForCausalLM,  # Llama, or Mistral where the config says so
        "LLaVATrainer": ContrastiveLLaVATrainer,
        "TrainingArguments": make_training_arguments(namespace["TrainingArguments"]),
        "DataArguments": make_data_arguments(namespace["DataArguments"]),
        "make_supervised_data_module": make_checked_data_module(
            namespace["make_supervised_data_module"], list(sys.argv[1:] if argv is None else argv)),
        "safe_save_model_for_hf_trainer": make_final_save(namespace["safe_save_model_for_hf_trainer"]),
    }


def activate(namespace: dict, argv: list[str] | None = None) -> None:
    """Used by patches/: switch an upstream `llava/train/train.py` module namespace to the plugin
    (idempotent) and seed from `--seed` before the model is built."""
    if not namespace.get("_LLAVA_CONTRASTIVE_ACTIVE"):
        namespace.update(plugin_globals(namespace, argv))
        namespace["_LLAVA_CONTRASTIVE_ACTIVE"] = True
    seed_from_argv(list(sys.argv[1:] if argv is None else argv))


@contextlib.contextmanager
def patched_upstream():
    """Point upstream's `train()` at the plugin's classes for the duration of the call."""
    from llava_contrastive.hosts.llava import compat

    module = compat.upstream_train_module()
    namespace = vars(module)
    if namespace.get("_LLAVA_CONTRASTIVE_ACTIVE"):  # a patched fork did it already
        yield module
        return
    replacements = plugin_globals(namespace)
    saved = {name: namespace[name] for name in replacements}
    namespace.update(replacements)
    try:
        yield module
    finally:
        namespace.update(saved)


def check_pretrained_projector(argv: list[str]) -> None:
    """A --pretrain_mm_mlp_adapter that does not fit the model fails here, naming the file and the
    shapes, instead of deep inside upstream's strict load_state_dict."""
    parser = argparse.ArgumentParser(add_help=False)
    for flag, default in (("--pretrain_mm_mlp_adapter", None), ("--model_name_or_path", None),
                          ("--vision_tower", None), ("--mm_projector_type", "linear")):
        parser.add_argument(flag, default=default)
    known = parser.parse_known_args(argv)[0]
    if not (known.pretrain_mm_mlp_adapter and known.model_name_or_path and known.vision_tower):
        return
    from transformers import AutoConfig, CLIPVisionConfig

    from llava_contrastive.hosts.llava.checkpoint import check_projector_file

    try:
        hidden = AutoConfig.from_pretrained(known.model_name_or_path).hidden_size
        mm_hidden = CLIPVisionConfig.from_pretrained(known.vision_tower).hidden_size
    except Exception as err:  # noqa: BLE001 - upstream reports unreachable models itself
        logger.debug("projector pre-check skipped: %s", err)
        return
    try:
        check_projector_file(known.pretrain_mm_mlp_adapter, known.mm_projector_type, mm_hidden, hidden)
    except ValueError as err:  # a user error: one message, exit code 2, before the model loads
        from llava_contrastive.training.preflight import error, exit_on_errors

        exit_on_errors([error(str(err))])


def main(argv: list[str] | None = None, attn_implementation: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if int(os.environ.get("LOCAL_RANK", "0") or 0) <= 0 else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from llava_contrastive.training.preflight import run_preflight

    run_preflight(argv, host="llava")  # user errors: exit 2 here, before torch or any model loads
    from llava_contrastive.training.jit_ops import prepare_if_requested

    prepare_if_requested(argv)  # DeepSpeed's JIT op, past a lock a killed build left (else a silent hang)
    from llava_contrastive.core.text_cache import TextCacheMismatch

    check_pretrained_projector(argv)
    seed_from_argv(argv)
    saved_argv = sys.argv
    sys.argv = [saved_argv[0]] + argv
    try:
        with patched_upstream() as module:
            module.train(attn_implementation=attn_implementation)
        shutdown_process_group()
    except TextCacheMismatch as err:  # --contrastive_text_cache built for other settings (user error)
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved_argv
    return 0


def shutdown_process_group() -> None:
    """Tear the process group down before interpreter exit: left to the atexit order, gloo's
    threads can abort the process (SIGABRT) after everything was saved."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
