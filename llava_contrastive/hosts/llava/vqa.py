"""VQA inference on the upstream host: ``python -m llava_contrastive.vqa [--host llava] ...``.

The model comes from upstream's ``llava.model.builder.load_pretrained_model`` and prompts are built
as upstream's ``llava/eval/model_vqa_loader.py`` builds them (``conv_templates[--conv-mode]``,
``tokenizer_image_token``, ``process_images``), so answers match upstream's script; on top of it:
CPU as well as GPU, batched decoding (left padding), text-only questions, resumable answers files.

Two things of upstream's builder are wrapped here (upstream is not patched): it hard-codes
``torch_dtype=float16`` (on CPU we load float32, see ``weights_at``), and it chooses the loading
path from the model *name* ("llava" in it, "lora" for unmerged LoRA), so the name passed to it is
derived from what the directory holds (``loader_name``); answers keep upstream's ``model_id``.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import os
import sys
from typing import List, Optional, Sequence

import torch

from llava_contrastive.evaluation.vqa import (VQAUsageError, has_image, main_for_host, resolve_device, resolve_dtype,
                                               until_eos)
from llava_contrastive.evaluation.vqa import run as run_vqa

HOST = "llava"


# ---- which loading path -----------------------------------------------------------------------
def checkpoint_kind(model_path: str) -> str:
    """``lora`` (adapter_config.json: unmerged LoRA, needs --model-base), ``projector`` (only
    mm_projector.bin: a stage-1 output, needs --model-base) or ``full``."""
    if os.path.isfile(os.path.join(model_path, "adapter_config.json")):
        return "lora"
    weights = [p for pattern in ("*.safetensors", "pytorch_model*.bin", "model*.bin")
               for p in glob.glob(os.path.join(model_path, pattern))]
    if os.path.isfile(os.path.join(model_path, "mm_projector.bin")) and not weights:
        return "projector"
    return "full"


def loader_name(model_name: str, kind: str) -> str:
    """The name upstream's builder needs to take the right path for ``kind`` ("llava" in it;
    "lora" in it exactly for LoRA), keeping the rest ("mistral", "mpt" choose classes)."""
    name = model_name if "llava" in model_name.lower() else f"llava-{model_name}"
    if kind == "lora" and "lora" not in name.lower():
        name += "-lora"
    if kind != "lora" and "lora" in name.lower():
        raise VQAUsageError(f"--model-path {model_name}: 'lora' in the name makes upstream's loader treat it as an "
                            "unmerged LoRA, but it holds no adapter_config.json; rename the directory")
    return name


class _AtDtype:
    """Stands for an upstream model class inside upstream's builder, replacing its hard-coded
    ``torch_dtype=float16`` with ``dtype``."""

    def __init__(self, cls, dtype: torch.dtype):
        self.cls, self.dtype = cls, dtype

    def from_pretrained(self, *args, **kwargs):
        kwargs["torch_dtype"] = self.dtype
        return self.cls.from_pretrained(*args, **kwargs)


@contextlib.contextmanager
def weights_at(dtype: torch.dtype):
    """Upstream's ``load_pretrained_model`` loading the LLM at ``dtype`` (float16: unchanged)."""
    from llava.model import builder

    names = [n for n in ("LlavaLlamaForCausalLM", "LlavaMistralForCausalLM", "LlavaMptForCausalLM")
             if hasattr(builder, n)] if dtype != torch.float16 else []
    saved = {n: getattr(builder, n) for n in names}
    try:
        for n in names:
            setattr(builder, n, _AtDtype(saved[n], dtype))
        yield
    finally:
        for n, cls in saved.items():
            setattr(builder, n, cls)


def load_model(model_path: str, model_base: Optional[str], device: str, dtype: torch.dtype):
    """(tokenizer, model, image_processor, model_id) through upstream's ``load_pretrained_model``,
    with every weight at ``dtype`` on ``device``."""
    from llava.mm_utils import get_model_name_from_path
    from llava.model.builder import load_pretrained_model

    model_path = os.path.expanduser(model_path)
    model_id = get_model_name_from_path(model_path)
    kind = checkpoint_kind(model_path)
    if kind in ("lora", "projector") and not model_base:
        raise VQAUsageError(f"--model-path {model_path} holds {'an unmerged LoRA' if kind == 'lora' else 'only mm_projector.bin'}: "
                            "pass the base LLM with --model-base")
    name = loader_name(model_id, kind)
    with weights_at(dtype):
        if device == "cuda":
            tokenizer, model, processor, _ = load_pretrained_model(model_path, model_base, name)  # upstream's GPU defaults
        else:
            tokenizer, model, processor, _ = load_pretrained_model(model_path, model_base, name,
                                                                   device_map=device, device=device)
    tower = model.get_vision_tower()
    if tower is not None and device != "cuda" and tower.dtype != dtype:
        tower.is_loaded = False  # the builder cast the tower to float16: load it again, at full precision
        tower.load_model(device_map=device)
        tower.to(device=device, dtype=dtype)
    if kind == "projector" and dtype != torch.float16:  # the builder rounds the projector to float16
        state = torch.load(os.path.join(model_path, "mm_projector.bin"), map_location="cpu", weights_only=True)
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    model.eval()
    return tokenizer, model, processor, model_id


# ---- answering --------------------------------------------------------------------------------
class LlavaAnswerer:
    """Upstream prompt building + ``model.generate``; a batch is left-padded and decoded greedily
    (``--temperature 0``) or sampled like upstream's script."""

    def __init__(self, tokenizer, model, image_processor, model_id: str, *, conv_mode: str, image_folder: str,
                 temperature: float = 0.0, top_p: Optional[float] = None, num_beams: int = 1,
                 max_new_tokens: int = 128):
        self.tokenizer, self.model, self.image_processor, self.model_id = tokenizer, model, image_processor, model_id
        self.conv_mode, self.image_folder = conv_mode, image_folder
        self.temperature, self.top_p, self.num_beams, self.max_new_tokens = temperature, top_p, num_beams, max_new_tokens
        # upstream's splice re-pads the spliced batch on this side; left, so that generation continues every row
        model.config.tokenizer_padding_side = "left"
        self.pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id)
                           if i is not None)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "LlavaAnswerer":
        from llava.conversation import conv_templates

        if args.conv_mode not in conv_templates:
            raise VQAUsageError(f"--conv-mode {args.conv_mode}: not one of upstream's templates "
                                f"({', '.join(sorted(conv_templates))})")
        device = resolve_device(args.device, torch.cuda.is_available())
        dtype = getattr(torch, resolve_dtype(args.dtype, device))
        tokenizer, model, processor, model_id = load_model(args.model_path, args.model_base, device, dtype)
        return cls(tokenizer, model, processor, model_id, conv_mode=args.conv_mode,
                   image_folder=os.path.expanduser(args.image_folder), temperature=args.temperature,
                   top_p=args.top_p, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)

    def prompt_ids(self, question: dict) -> torch.Tensor:
        """[L] ids of upstream's prompt for one question (IMAGE_TOKEN_INDEX where the image goes)."""
        from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
        from llava.conversation import conv_templates
        from llava.mm_utils import tokenizer_image_token

        qs = question["text"]
        if has_image(question):
            image = DEFAULT_IMAGE_TOKEN
            if getattr(self.model.config, "mm_use_im_start_end", False):
                image = DEFAULT_IM_START_TOKEN + image + DEFAULT_IM_END_TOKEN
            qs = image + "\n" + qs
        conv = conv_templates[self.conv_mode].copy()
        conv.append_message(conv.roles[0], qs)
        conv.append_message(conv.roles[1], None)
        return tokenizer_image_token(conv.get_prompt(), self.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")

    def images(self, batch: List[dict]):
        """(pixels: [B, 3, H, W] or a list for anyres, sizes) as upstream's process_images makes them."""
        from PIL import Image

        from llava.mm_utils import process_images

        pixels, sizes = [], []
        for q in batch:
            path = os.path.join(self.image_folder, q["image"])
            if not os.path.isfile(path):
                raise FileNotFoundError(f"question {q['question_id']}: image {path} not found (check --image-folder)")
            image = Image.open(path).convert("RGB")
            pixels.append(process_images([image], self.image_processor, self.model.config)[0])
            sizes.append(image.size)
        tensor = all(p.shape == pixels[0].shape for p in pixels)
        cast = dict(device=self.model.device, dtype=self.model.dtype)
        return (torch.stack(pixels).to(**cast) if tensor else [p.to(**cast) for p in pixels]), sizes

    @torch.inference_mode()
    def answer(self, batch: List[dict]) -> List[str]:
        ids = [self.prompt_ids(q) for q in batch]
        input_ids, attention_mask = left_pad(ids, self.pad_id)
        device = self.model.device
        images, sizes = self.images(batch) if has_image(batch[0]) else (None, None)
        sample = self.temperature > 0
        extra = dict(temperature=self.temperature, top_p=self.top_p) if sample else {}
        out = self.model.generate(input_ids.to(device), attention_mask=attention_mask.to(device), images=images,
                                  image_sizes=sizes, do_sample=sample, num_beams=self.num_beams,
                                  max_new_tokens=self.max_new_tokens, use_cache=True, pad_token_id=self.pad_id,
                                  **extra)
        return [self.tokenizer.decode(until_eos(row, self.tokenizer.eos_token_id), skip_special_tokens=True).strip()
                for row in out]


def left_pad(rows: Sequence[torch.Tensor], pad_id: int):
    """([B, L] ids, [B, L] mask) with every row right-aligned."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = r
        mask[i, length - len(r):] = 1
    return ids, mask


def run(argv: Optional[Sequence[str]] = None):
    return run_vqa(argv, LlavaAnswerer.from_args, HOST)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return main_for_host(argv, LlavaAnswerer.from_args, HOST)


if __name__ == "__main__":
    sys.exit(main())
