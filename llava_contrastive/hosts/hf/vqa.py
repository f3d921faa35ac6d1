"""VQA inference on the native host: ``python -m llava_contrastive.vqa --host hf ...``.

A transformers ``LlavaForConditionalGeneration`` directory (``from_pretrained``) and its processor
(``AutoProcessor``); the same flags and answers file as the upstream host. Prompts: ``--conv-mode``
``llava_v1``/``vicuna_v1`` give the ``v1`` prompt this host's stage 2 trains on
(``instruct_data.generation_prompt``), ``chat_template`` the tokenizer's own chat template (stage 2
with ``--version chat_template``), ``plain`` gives ``<image>\\n`` + question. Images are padded to a
square with the processor's mean colour under ``--image_aspect_ratio pad`` (upstream v1.5's setting).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

import torch

from llava_contrastive.evaluation.vqa import (VQAUsageError, has_image, main_for_host, resolve_device, resolve_dtype,
                                               until_eos)
from llava_contrastive.evaluation.vqa import run as run_vqa
from llava_contrastive.hosts.hf.instruct_data import (chat_generation_prompt, chat_turn_end_ids, expand2square,
                                                      generation_prompt, user_text)

HOST = "hf"
CONV_MODES = ("llava_v1", "vicuna_v1", "chat_template", "plain")


def question_prompt(question: dict, conv_mode: str, tokenizer=None) -> str:
    """The text prompt of one question (``<image>`` expands to the image tokens in the processor)."""
    if conv_mode == "plain":
        return user_text(question["text"], has_image(question))
    if conv_mode == "chat_template":
        return chat_generation_prompt(tokenizer, question["text"], has_image=has_image(question))
    return generation_prompt(question["text"], has_image=has_image(question))


class HFAnswerer:
    def __init__(self, model, processor, model_id: str, *, conv_mode: str, image_folder: str,
                 image_aspect_ratio: str = "pad", temperature: float = 0.0, top_p: Optional[float] = None,
                 num_beams: int = 1, max_new_tokens: int = 128):
        self.model, self.processor, self.model_id = model, processor, model_id
        self.conv_mode, self.image_folder, self.image_aspect_ratio = conv_mode, image_folder, image_aspect_ratio
        self.temperature, self.top_p, self.num_beams, self.max_new_tokens = temperature, top_p, num_beams, max_new_tokens
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.pad_id = next(i for i in (self.tokenizer.pad_token_id, self.tokenizer.unk_token_id,
                                       self.tokenizer.eos_token_id) if i is not None)
        stops = [self.tokenizer.eos_token_id] + (chat_turn_end_ids(self.tokenizer) if conv_mode == "chat_template"
                                                 else [])
        self.stop_ids = [i for i in stops if i is not None]

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "HFAnswerer":
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        if args.conv_mode not in CONV_MODES:
            raise VQAUsageError(f"--conv-mode {args.conv_mode}: the hf host has {', '.join(CONV_MODES)}")
        if args.model_base:
            raise VQAUsageError("--model-base: the hf host loads merged checkpoints only "
                                "(merge a LoRA with `python -m llava_contrastive.hosts.hf.finetune merge ...`)")
        device = resolve_device(args.device, torch.cuda.is_available())
        dtype = getattr(torch, resolve_dtype(args.dtype, device))
        path = os.path.expanduser(args.model_path)
        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
        processor = AutoProcessor.from_pretrained(path)
        if args.conv_mode == "chat_template" and not getattr(processor.tokenizer, "chat_template", None):
            raise VQAUsageError(f"--conv-mode chat_template: the tokenizer of {path} has no chat template. Fix: "
                                f"the --conv-mode its stage 2 trained with (llava_v1 for --version v1)")
        return cls(model, processor, os.path.basename(path.rstrip("/")), conv_mode=args.conv_mode,
                   image_folder=os.path.expanduser(args.image_folder), image_aspect_ratio=args.image_aspect_ratio,
                   temperature=args.temperature, top_p=args.top_p, num_beams=args.num_beams,
                   max_new_tokens=args.max_new_tokens)

    def image(self, question: dict):
        from PIL import Image

        path = os.path.join(self.image_folder, question["image"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"question {question['question_id']}: image {path} not found (check --image-folder)")
        image = Image.open(path).convert("RGB")
        if self.image_aspect_ratio == "pad":
            image = expand2square(image, tuple(int(x * 255) for x in self.processor.image_processor.image_mean))
        return image

    @torch.inference_mode()
    def answer(self, batch: List[dict]) -> List[str]:
        prompts = [question_prompt(q, self.conv_mode, self.tokenizer) for q in batch]
        images = [self.image(q) for q in batch] if has_image(batch[0]) else None
        # a chat template writes its own special tokens (as stage 2 tokenised it)
        inputs = self.processor(text=prompts, images=images, return_tensors="pt", padding=True,
                                add_special_tokens=self.conv_mode != "chat_template")
        inputs = {k: (v.to(self.model.device, self.model.dtype) if k == "pixel_values" else v.to(self.model.device))
                  for k, v in inputs.items()}
        sample = self.temperature > 0
        extra = dict(temperature=self.temperature, top_p=self.top_p) if sample else {}
        out = self.model.generate(**inputs, do_sample=sample, num_beams=self.num_beams,
                                  max_new_tokens=self.max_new_tokens, pad_token_id=self.pad_id,
                                  eos_token_id=self.stop_ids, **extra)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [self.tokenizer.decode(until_eos(row, self.stop_ids), skip_special_tokens=True).strip()
                for row in new]


def run(argv: Optional[Sequence[str]] = None):
    return run_vqa(argv, HFAnswerer.from_args, HOST)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return main_for_host(argv, HFAnswerer.from_args, HOST)


if __name__ == "__main__":
    sys.exit(main())
