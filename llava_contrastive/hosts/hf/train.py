"""Stage-1 projector pretraining on transformers' native LLaVA, with the contrastive term.

    python -m llava_contrastive.hosts.hf.train \
        --model_name_or_path NATIVE_DIR            # or: --llm_dir LLM --vision_dir CLIP [--pretrain_mm_mlp_adapter mm_projector.bin]
        --data_path blip_laion_cc_sbu_558k.json --image_folder images \
        --output_dir out --per_device_train_batch_size 8 --learning_rate 1e-3 --max_steps 100 \
        --contrastive_weight 0.5 [--contrastive_loss siglip ...]   # every --contrastive_* flag of the core

Only ``model.multi_modal_projector`` and the contrastive head train. The output directory holds
``mm_projector.bin`` (upstream keys: drop-in for upstream stage 2 ``--pretrain_mm_mlp_adapter``),
``contrastive_head.bin``, and a complete native checkpoint + processor (``from_pretrained``-able).
Multi-rank CPU: ``torchrun --nproc_per_node 2 -m llava_contrastive.hosts.hf.train ... --use_cpu``
(``use_cpu`` is forced on machines without CUDA; without it each rank trains on everything).
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.distributed as dist
import transformers
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments

from ...config import ContrastiveArguments
from ...head import clamp_logit_scale, find_contrastive_model, optimizer_with_head_group
from . import convert
from .data import Collator, PretrainDataset
from .model import ContrastiveLlavaForConditionalGeneration, ContrastiveLlavaOutput

logger = logging.getLogger("llava_contrastive")
_STAT_KEYS = ("ntp_loss", "contrastive_loss", "steps", "rows", "i2t_hits", "t2i_hits", "acc_rows")


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "a native LLaVA checkpoint (convert.py build)"})
    llm_dir: Optional[str] = field(default=None, metadata={"help": "build the native model from this Llama ..."})
    vision_dir: Optional[str] = field(default=None, metadata={"help": "... and this CLIP vision tower"})
    pretrain_mm_mlp_adapter: Optional[str] = field(default=None, metadata={"help": "initial projector (upstream or native keys)"})
    vision_feature_layer: int = field(default=-2)


@dataclass
class DataArguments:
    data_path: str = field(default=None, metadata={"help": "LLaVA-Pretrain JSON"})
    image_folder: str = field(default=None)
    model_max_length: int = field(default=256)


class ClampLogitScale(TrainerCallback):
    """Keeps the logit scale under its cap after each optimizer step."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            clamp_logit_scale(model)


class ContrastiveHFTrainer(Trainer):
    """transformers.Trainer + the head's optimizer group (--contrastive_lr, no decay) and the
    ntp_loss / contrastive_loss / logit_scale / in-batch accuracy logs (averaged over ranks)."""

    def __init__(self, *a, contrastive_args: ContrastiveArguments, **kw):
        super().__init__(*a, **kw)
        self.contrastive_args = contrastive_args
        self._contrastive_model = find_contrastive_model(self.model) if contrastive_args.enabled else None
        self._stats: Dict[str, torch.Tensor] = {}
        if self._contrastive_model is not None:
            self.add_callback(ClampLogitScale())

    def create_optimizer(self, *a, **kw):
        head_params = []
        if self.optimizer is None and self._contrastive_model is not None:
            head_params = self._contrastive_model.contrastive_head.trainable_parameters()
        lr = self.contrastive_args.contrastive_lr or self.args.learning_rate
        self.optimizer = optimizer_with_head_group(
            lambda: super(ContrastiveHFTrainer, self).create_optimizer(*a, **kw), head_params, lr)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        if model.training and isinstance(outputs, ContrastiveLlavaOutput) and outputs.contrastive_loss is not None:
            rows = outputs.contrastive_rows
            acc_rows = rows if outputs.i2t_accuracy is not None else torch.zeros_like(rows)
            zero = torch.zeros_like(rows)
            values = {"ntp_loss": outputs.ntp_loss.float(), "contrastive_loss": outputs.contrastive_loss.float(),
                      "steps": torch.ones_like(rows), "rows": rows,
                      "i2t_hits": (outputs.i2t_accuracy if outputs.i2t_accuracy is not None else zero) * acc_rows,
                      "t2i_hits": (outputs.t2i_accuracy if outputs.t2i_accuracy is not None else zero) * acc_rows,
                      "acc_rows": acc_rows}
            for k, v in values.items():
                self._stats[k] = self._stats.get(k, 0) + v.detach().float()
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and self._contrastive_model is not None:
            logs.update(self._pop_logs())
        super().log(logs, *args, **kwargs)

    def _pop_logs(self):
        device = self.args.device
        vec = torch.stack([torch.as_tensor(self._stats.get(k, 0.0), dtype=torch.float32, device=device)
                           for k in _STAT_KEYS])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(vec)
        self._stats = {}
        s = dict(zip(_STAT_KEYS, vec.tolist()))
        if s["steps"] == 0:
            return {}
        out = {"ntp_loss": round(s["ntp_loss"] / s["steps"], 6),
               "contrastive_loss": round(s["contrastive_loss"] / s["steps"], 6),
               "logit_scale": round(float(self._contrastive_model.contrastive_head.logit_scale().detach()), 4)}
        if s["acc_rows"] > 0:
            out["i2t_acc"] = round(s["i2t_hits"] / s["acc_rows"], 4)
            out["t2i_acc"] = round(s["t2i_hits"] / s["acc_rows"], 4)
        return out


def _gathered_state(module, zero3: bool) -> Dict[str, torch.Tensor]:
    if zero3:
        import deepspeed
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def save_stage1(trainer: Trainer, model, processor, output_dir: str) -> None:
    """mm_projector.bin (upstream keys) + contrastive_head.bin (+ a full native checkpoint unless ZeRO-3)."""
    zero3 = transformers.integrations.is_deepspeed_zero3_enabled()
    proj = _gathered_state(model.model.multi_modal_projector, zero3)
    head = _gathered_state(model.contrastive_head, zero3) if model.contrastive_head is not None else None
    if trainer.args.should_save:
        os.makedirs(output_dir, exist_ok=True)
        native = {convert.NATIVE_PREFIX + k: v for k, v in proj.items()}
        torch.save(convert.native_to_upstream(native), os.path.join(output_dir, "mm_projector.bin"))
        if head is not None:
            torch.save(head, os.path.join(output_dir, "contrastive_head.bin"))
        if not zero3:
            model.save_pretrained(output_dir)
            processor.save_pretrained(output_dir)


def main(argv=None) -> Trainer:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, ContrastiveArguments))
    margs, dargs, targs, cargs = parser.parse_args_into_dataclasses(args=argv)
    if not torch.cuda.is_available() and not targs.use_cpu:
        targs.use_cpu = True  # multi-rank CPU runs: without it every rank trains on everything
    targs.remove_unused_columns = False
    cargs.validate()
    logging.basicConfig(level=logging.INFO if targs.should_log else logging.WARNING)
    if targs.deepspeed and "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo")  # before from_pretrained under ZeRO-3

    if margs.model_name_or_path:
        model = ContrastiveLlavaForConditionalGeneration.from_pretrained(margs.model_name_or_path, dtype=torch.float32)
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained(margs.model_name_or_path)
        if margs.pretrain_mm_mlp_adapter:
            convert.load_projector(model, margs.pretrain_mm_mlp_adapter)
    elif margs.llm_dir and margs.vision_dir:
        if transformers.integrations.is_deepspeed_zero3_enabled():
            raise ValueError("under ZeRO-3 build the native checkpoint first (convert.py build) and pass "
                             "--model_name_or_path")
        model, processor = convert.build_native_llava(
            margs.llm_dir, margs.vision_dir, None, projector=margs.pretrain_mm_mlp_adapter,
            vision_feature_layer=margs.vision_feature_layer, model_class=ContrastiveLlavaForConditionalGeneration)
    else:
        raise ValueError("give --model_name_or_path, or --llm_dir and --vision_dir")
    model.config.use_cache = False
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    model.init_contrastive(cargs, processor.tokenizer)

    dataset = PretrainDataset(dargs.data_path, dargs.image_folder, processor,
                              image_seq_length=model.config.image_seq_length, max_length=dargs.model_max_length)
    trainer = ContrastiveHFTrainer(model=model, args=targs, train_dataset=dataset,
                                   data_collator=Collator(processor.tokenizer.pad_token_id),
                                   processing_class=processor, contrastive_args=cargs)
    trainer.train()
    save_stage1(trainer, model, processor, targs.output_dir)
    return trainer


if __name__ == "__main__":
    main()
