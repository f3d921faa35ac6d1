"""Stage 2 (instruction tuning) on transformers' native LLaVA: LoRA / QLoRA (8-bit, 4-bit) on the LLM,
projector trained in full, vision tower frozen, upstream's ``v1`` conversation template.

    python -m llava_contrastive.hosts.hf.finetune \\
        --model_name_or_path NATIVE_DIR             # stage-1 output of hosts.hf.train, or convert.py build
        [--llm_dir LLM --vision_dir CLIP]           # instead: built into OUTPUT_DIR/base_model first
        [--pretrain_mm_mlp_adapter mm_projector.bin]  # stage-1 projector, upstream or native keys
        --data_path llava_v1_5_mix665k.json --image_folder ./playground/data \\
        --bits 16|8|4 --lora_r 128 --lora_alpha 256 --lora_dropout 0.05 \\
        --learning_rate 2e-4 --mm_projector_lr 2e-5 --model_max_length 2048 --image_aspect_ratio pad \\
        --output_dir out [--eval_size 0.01 --eval_strategy steps --eval_steps 500] \\
        [--gradient_checkpointing True] [--merge_and_export out/merged]   # + any TrainingArguments

    python -m llava_contrastive.hosts.hf.finetune merge --adapter out --out out/merged [--dtype float16]

Writes to ``output_dir``: the PEFT adapter (``adapter_model.safetensors`` + ``adapter_config.json``;
the adapter file also holds the trained projector, PEFT's ``modules_to_save``), ``mm_projector.bin``
(the trained projector in upstream's keys), the processor, and ``trainer_state.json``.
``--merge_and_export DIR`` (or the ``merge`` command) reloads the base in float32 -- also after 4-/8-bit
training --, merges LoRA into it and saves a plain native checkpoint + processor that
``LlavaForConditionalGeneration.from_pretrained`` and ``AutoProcessor`` load.

The contrastive term is refused here (``--contrastive_weight`` must stay 0): it pairs an image with
the caption tokens of its row (``labels != -100``), and in ``v1`` instruction data those are the
answers of every turn ("Yes.", "It is orange.", "2"), not a description of the image; text-only
rows have no image at all. The paper adds the term in stage 1, which ``hosts.hf.train`` does.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import transformers
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments

from llava_contrastive.core.config import ContrastiveArguments
from llava_contrastive.training.checkpointing import last_complete_checkpoint
from llava_contrastive.training.faults import fault_step
from llava_contrastive.core.head import optimizer_with_head_group
from llava_contrastive.hosts.hf import convert
from llava_contrastive.hosts.hf.instruct_data import InstructCollator, InstructDataset, split_records
from llava_contrastive.hosts.hf.launch import (init_distributed_for_deepspeed, joined_report_to, logging_dir_to_env,
                                              split_report_to, with_cpu_flag)
from llava_contrastive.hosts.hf.lora import load_stage2

logger = logging.getLogger("llava_contrastive")
PROJECTOR_KEY = "multi_modal_projector"


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "a native LLaVA checkpoint (hosts.hf.train output or convert.py build)"})
    llm_dir: Optional[str] = field(default=None, metadata={"help": "instead of --model_name_or_path: build the native model from this Llama ..."})
    vision_dir: Optional[str] = field(default=None, metadata={"help": "... and this CLIP or SigLIP vision tower (saved to OUTPUT_DIR/base_model)"})
    vision_feature_layer: int = field(default=-2, metadata={"help": "with --llm_dir/--vision_dir"})
    pretrain_mm_mlp_adapter: Optional[str] = field(default=None, metadata={"help": "stage-1 projector (upstream mm_projector.bin or native keys)"})
    version: str = field(default="v1", metadata={
        "help": "conversation template: v1 (vicuna_v1, upstream's) or chat_template (the LLM tokenizer's own, "
                "e.g. Qwen2's ChatML; answer with python -m llava_contrastive.vqa --host hf --conv-mode chat_template)"})
    bits: int = field(default=16, metadata={"help": "16: LoRA on the float base; 8 / 4: QLoRA on an int8 / NF4 LLM"})
    lora_enable: bool = field(default=True, metadata={"help": "upstream flag; this entry trains LoRA only"})
    lora_r: int = field(default=64)
    lora_alpha: int = field(default=16)
    lora_dropout: float = field(default=0.05)
    mm_projector_lr: Optional[float] = field(default=None, metadata={"help": "learning rate of the projector (default: --learning_rate)"})
    merge_and_export: Optional[str] = field(default=None, metadata={"help": "after training: merge LoRA into a float32 reload of the base and save a native checkpoint here"})
    export_dtype: str = field(default="auto", metadata={"help": "dtype of the merged export: auto (the base checkpoint's) | float32 | bfloat16 | float16"})
    log_grad_norms: bool = field(default=False, metadata={"help": "log lora_grad_norm, lora_grad_nonzero (fraction of LoRA tensors with a non-zero gradient) and projector_grad_norm (before clipping) with the loss"})


@dataclass
class DataArguments:
    data_path: str = field(default=None, metadata={"help": "LLaVA-Instruct / mix665k JSON"})
    image_folder: Optional[str] = field(default=None)
    model_max_length: int = field(default=2048)
    image_aspect_ratio: str = field(default="square", metadata={"help": "square | pad (upstream's stage-2 recipe: pad)"})
    eval_data_path: Optional[str] = field(default=None, metadata={"help": "evaluation records (same format)"})
    eval_size: float = field(default=0, metadata={"help": "hold out this many records of --data_path for evaluation (int, or a fraction < 1)"})
    strict_data: bool = field(default=False, metadata={"help": "raise on the first record that cannot be used instead of dropping it"})
    lazy_preprocess: bool = field(default=True, metadata={"help": "upstream flag, accepted (rows are always tokenised lazily)"})


@dataclass
class Stage2ContrastiveArguments(ContrastiveArguments):
    contrastive_weight: float = field(default=0.0, metadata={"help": "must stay 0 in stage 2 (see the module docstring)"})


class GradStats(TrainerCallback):
    """LoRA / projector gradient norms of each optimizer step, before clipping (recorded by
    Stage2Trainer._clip_grad_norm; without clipping, by the callback just before the step), averaged
    over the steps of a logging interval. ``lora_grad_nonzero``: fraction of LoRA tensors whose
    gradient is non-zero (0.5 on the first step, where every lora_B is still zero so lora_A gets none)."""

    def __init__(self):
        self.sums: Dict[str, float] = {}
        self.steps = 0
        self._recorded = False

    def record(self, model) -> None:
        lora_sq, proj_sq, nonzero, total = 0.0, 0.0, 0, 0
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            g = p.grad
            sq = 0.0 if g is None else float(g.detach().float().pow(2).sum())
            if "lora_" in name:
                lora_sq += sq
                total += 1
                nonzero += int(sq > 0)
            elif PROJECTOR_KEY in name:
                proj_sq += sq
        for k, v in (("lora_grad_norm", math.sqrt(lora_sq)), ("projector_grad_norm", math.sqrt(proj_sq)),
                     ("lora_grad_nonzero", nonzero / max(total, 1))):
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1
        self._recorded = True

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self._recorded and model is not None:
            self.record(model)
        self._recorded = False

    def pop(self) -> Dict[str, float]:
        out = {k: round(v / self.steps, 8) for k, v in self.sums.items()} if self.steps else {}
        self.sums, self.steps = {}, 0
        return out


class Stage2Trainer(Trainer):
    """transformers.Trainer + a projector parameter group with its own learning rate
    (``--mm_projector_lr``, as upstream's LLaVATrainer; empty groups are never created) and the
    optional gradient-norm logs."""

    def __init__(self, *a, mm_projector_lr: Optional[float] = None, grad_stats: Optional[GradStats] = None, **kw):
        super().__init__(*a, **kw)
        self.mm_projector_lr = mm_projector_lr
        self.grad_stats = grad_stats
        if grad_stats is not None:
            self.add_callback(grad_stats)

    def create_optimizer(self, model=None):
        if self.optimizer is not None or self.mm_projector_lr is None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        proj = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad and PROJECTOR_KEY in n]
        decay = set(self.get_decay_parameter_names(opt_model))
        self.optimizer = optimizer_with_head_group(
            lambda: super(Stage2Trainer, self).create_optimizer(model), [p for _, p in proj], self.mm_projector_lr,
            weight_decay=self.args.weight_decay, decayed=[p for n, p in proj if n in decay])
        return self.optimizer

    def _save_optimizer_and_scheduler(self, output_dir):
        if fault_step("kill_in_save") == self.state.global_step:
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: die with the checkpoint half-written
        return super()._save_optimizer_and_scheduler(output_dir)

    def _clip_grad_norm(self, model):
        if self.grad_stats is not None:
            self.grad_stats.record(model)  # before clipping
        return super()._clip_grad_norm(model)

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and self.grad_stats is not None:
            logs.update(self.grad_stats.pop())
        super().log(logs, *args, **kwargs)


# ---- outputs -------------------------------------------------------------------------------------
def trained_projector(peft_model) -> Dict[str, torch.Tensor]:
    """The projector the adapter trains (PEFT's ``modules_to_save`` copy), native keys."""
    module = peft_model.get_base_model().model.multi_modal_projector
    copies = getattr(module, "modules_to_save", None)
    if copies is not None:
        module = copies["default"] if "default" in copies else next(iter(copies.values()))
    return {convert.NATIVE_PREFIX + k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _torch_dtype(name: str, config=None) -> torch.dtype:
    if name == "auto":
        d = None if config is None else (getattr(config, "dtype", None) or getattr(config, "torch_dtype", None))
        if isinstance(d, str):
            d = getattr(torch, d, None)
        return d if isinstance(d, torch.dtype) else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {name!r}") from None


def merge_and_export(adapter_dir, out_dir, base_dir=None, dtype: str = "auto"):
    """Reload the base in float32 (never the 4-/8-bit weights trained against), apply the adapter,
    merge LoRA and the trained projector into it, save a plain native checkpoint + processor."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    adapter_dir = Path(adapter_dir)
    if base_dir is None:
        base_dir = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = LlavaForConditionalGeneration.from_pretrained(str(base_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    if type(model.model.multi_modal_projector).__name__ != "LlavaMultiModalProjector":
        raise RuntimeError(f"projector not unwrapped after merging: {type(model.model.multi_modal_projector)}")
    for attr in ("contrastive",):  # stage-1 extras: the export is a plain native checkpoint
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    target = _torch_dtype(dtype, AutoConfig.from_pretrained(str(base_dir)))
    model.to(target)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    proc_src = adapter_dir if (adapter_dir / "processor_config.json").exists() or \
        (adapter_dir / "tokenizer_config.json").exists() else Path(base_dir)
    AutoProcessor.from_pretrained(str(proc_src)).save_pretrained(str(out_dir))
    logger.info("[stage2] merged %s into %s (%s) -> %s", adapter_dir, base_dir, target, out_dir)
    return out_dir


# ---- entry ---------------------------------------------------------------------------------------
def _check_args(margs, dargs, targs, cargs):
    cargs.validate()
    if cargs.enabled:
        raise ValueError(
            "--contrastive_weight > 0 is refused in stage 2: the term pairs each image with its row's "
            "label tokens as the caption, and in v1 instruction data those are the answers of all turns "
            "(short replies such as 'Yes.' or '2', not descriptions of the image; text-only rows have no "
            "image). Add the term in stage 1 (python -m llava_contrastive.hosts.hf.train), as the paper does.")
    if not margs.lora_enable:
        raise ValueError("--lora_enable False (full fine-tune) is not supported by this entry: it trains LoRA adapters")
    if margs.version not in ("v1", "vicuna_v1", "chat_template"):
        raise ValueError(f"--version {margs.version!r}: choose v1 (vicuna_v1, upstream's template) or chat_template "
                         f"(the tokenizer's own)")
    if margs.bits not in (16, 8, 4):
        raise ValueError(f"--bits must be 16, 8 or 4, got {margs.bits}")
    if not dargs.data_path:
        raise ValueError("--data_path is required")
    if dargs.eval_data_path and dargs.eval_size:
        raise ValueError("give --eval_data_path or --eval_size, not both")
    if margs.bits != 16 and transformers.integrations.is_deepspeed_zero3_enabled():
        raise ValueError("--bits 4/8 cannot be combined with DeepSpeed ZeRO-3 (quantised weights cannot be partitioned)")
    if bool(margs.model_name_or_path) == bool(margs.llm_dir and margs.vision_dir):
        raise ValueError("give --model_name_or_path (native checkpoint), or --llm_dir and --vision_dir")


def _base_dir(margs, targs) -> str:
    if margs.model_name_or_path:
        return margs.model_name_or_path
    out = Path(targs.output_dir) / "base_model"
    if targs.should_save and not (out / "config.json").exists():
        dtype = torch.bfloat16 if targs.bf16 else torch.float16 if targs.fp16 else torch.float32
        # the stage-1 projector decides the projector type (linear or mlp2x_gelu) of the base model
        convert.build_native_llava(margs.llm_dir, margs.vision_dir, out, vision_feature_layer=margs.vision_feature_layer,
                                   dtype=dtype, projector=margs.pretrain_mm_mlp_adapter)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return str(out)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["merge"]:
        return merge_main(argv[1:])
    argv = with_cpu_flag(joined_report_to(logging_dir_to_env(argv)))
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, Stage2ContrastiveArguments))
    margs, dargs, targs, cargs = parser.parse_args_into_dataclasses(args=argv)
    split_report_to(targs)
    logging.basicConfig(level=logging.INFO if targs.should_log else logging.WARNING,
                        format="%(message)s")
    _check_args(margs, dargs, targs, cargs)
    _stage2_training_args(targs)
    if targs.deepspeed:  # DeepSpeed's JIT op, past a lock a killed build left (else a silent hang)
        from llava_contrastive.training.jit_ops import prepare_deepspeed_ops

        prepare_deepspeed_ops()
    init_distributed_for_deepspeed(targs)
    if margs.bits == 8:
        warnings.filterwarnings("ignore", message=".*inputs will be cast from torch.float32 to float16.*")

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    base_dir = _base_dir(margs, targs)
    processor = AutoProcessor.from_pretrained(base_dir)
    compute_dtype = torch.bfloat16 if targs.bf16 else torch.float16 if targs.fp16 else torch.float32
    transformers.set_seed(targs.seed)  # LoRA A is initialised at random before the Trainer seeds
    device_map = None
    if margs.bits != 16 and torch.cuda.is_available():
        device_map = {"": int(os.environ.get("LOCAL_RANK", 0))}
    model = load_stage2(base_dir, bits=margs.bits, lora_r=margs.lora_r, lora_alpha=margs.lora_alpha,
                        lora_dropout=margs.lora_dropout, projector=margs.pretrain_mm_mlp_adapter,
                        model_class=LlavaForConditionalGeneration, dtype=compute_dtype, device_map=device_map)
    base = model.get_base_model()
    base.config.use_cache = False
    if getattr(base.config, "text_config", None) is not None:
        base.config.text_config.use_cache = False
    if margs.bits == 4:
        n4 = sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit"
                 and getattr(m, "support_avx512bf16_for_cpu", True) is False)
        logger.info("[stage2] 4-bit: CPU inference repacking disabled on %d Linear4bit layers", n4)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    logger.info("[stage2] bits=%d, trainable %d parameters (LoRA %d, projector %d)", margs.bits, n_train, n_lora,
                n_train - n_lora)

    train_ds, eval_ds = _datasets(dargs, targs, processor, base.config.image_seq_length, margs.version)

    trainer = Stage2Trainer(model=model, args=targs, train_dataset=train_ds, eval_dataset=eval_ds,
                            data_collator=InstructCollator(processor.tokenizer.pad_token_id),
                            processing_class=processor, mm_projector_lr=margs.mm_projector_lr,
                            grad_stats=GradStats() if margs.log_grad_norms else None)
    trainer.train(resume_from_checkpoint=_last_checkpoint(targs))
    ckpt = base.is_activation_checkpointing if hasattr(type(base), "is_activation_checkpointing") \
        else getattr(base, "is_gradient_checkpointing", False)
    logger.info("[stage2] activation checkpointing was %s", "on" if ckpt else "off")
    trainer.save_state()
    save_stage2(trainer, targs.output_dir)
    if margs.merge_and_export and targs.should_save:
        del trainer, model, base
        merge_and_export(targs.output_dir, margs.merge_and_export, base_dir=base_dir, dtype=margs.export_dtype)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return 0


def _stage2_training_args(targs) -> None:
    """Trainer settings stage 2 needs whatever the command line says."""
    targs.remove_unused_columns = False  # pixel_values is optional per batch
    targs.prediction_loss_only = True   # evaluation = loss; never gather [batch, seq, vocab] logits
    if not torch.cuda.is_available():
        targs.dataloader_pin_memory = False
    if targs.ddp_find_unused_parameters is None and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        # a micro-batch without images leaves the projector out of the graph on that rank
        targs.ddp_find_unused_parameters = True
    # transformers 5.x: --gradient_checkpointing is an alias of --activation_checkpointing; non-reentrant
    # (the 5.x default) is needed here: the frozen embeddings give checkpointed blocks no input grad
    kw_name = "activation_checkpointing_kwargs" if hasattr(targs, "activation_checkpointing_kwargs") \
        else "gradient_checkpointing_kwargs"
    if getattr(targs, "activation_checkpointing", None) or targs.gradient_checkpointing:
        if getattr(targs, kw_name) is None:
            setattr(targs, kw_name, {"use_reentrant": False})


def _datasets(dargs, targs, processor, image_seq_length: int, prompt_format: str = "v1"):
    """(train, eval or None) InstructDatasets: eval from --eval_data_path, or --eval_size held out."""
    with open(dargs.data_path) as f:
        records = json.load(f)
    eval_records = None
    if dargs.eval_data_path:
        with open(dargs.eval_data_path) as f:
            eval_records = json.load(f)
    elif dargs.eval_size:
        records, eval_records = split_records(records, dargs.eval_size, targs.seed)
    ds_kw = dict(image_folder=dargs.image_folder, processor=processor, image_seq_length=image_seq_length,
                 max_length=dargs.model_max_length, image_aspect_ratio=dargs.image_aspect_ratio,
                 strict=dargs.strict_data, prompt_format=prompt_format)
    train_ds = InstructDataset(records, name="train", **ds_kw)
    eval_ds = InstructDataset(eval_records, name="eval", **ds_kw) if eval_records else None
    if eval_ds is None and targs.eval_strategy != "no":
        raise ValueError("--eval_strategy needs --eval_data_path or --eval_size")
    return train_ds, eval_ds


def _last_checkpoint(targs) -> Optional[str]:
    """Re-running the same command resumes from the newest complete checkpoint in output_dir."""
    last = last_complete_checkpoint(targs.output_dir)
    if last:
        logger.info("[stage2] resuming from %s", last)
    return last


def save_stage2(trainer: Trainer, output_dir: str) -> None:
    """Adapter + processor (trainer.save_model) and the trained projector as mm_projector.bin."""
    trainer.save_model(output_dir)
    if transformers.integrations.is_deepspeed_zero3_enabled():
        import deepspeed
        module = trainer.model.get_base_model().model.multi_modal_projector
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            proj = trained_projector(trainer.model)
    else:
        proj = trained_projector(trainer.model)
    if trainer.args.should_save:
        kind = convert.native_projector_type(trainer.model.get_base_model().config)
        torch.save(convert.native_to_upstream(proj, projector_type=kind), os.path.join(output_dir, "mm_projector.bin"))


def merge_main(argv: List[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m llava_contrastive.hosts.hf.finetune merge",
                                 description="merge a stage-2 LoRA adapter into its base; save a native checkpoint")
    ap.add_argument("--adapter", required=True, help="stage-2 output_dir (adapter_config.json, adapter_model.safetensors)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--base", default=None, help="base checkpoint (default: adapter_config.json's base_model_name_or_path)")
    ap.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    merge_and_export(a.adapter, a.out, base_dir=a.base, dtype=a.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
