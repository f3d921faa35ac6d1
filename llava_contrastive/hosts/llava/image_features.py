"""Image features as upstream LLaVA computes them: ``python -m llava_contrastive.hosts.llava.image_features``.

The model is built with upstream's own code, the way upstream stage 2 starts from a stage-1
projector: ``LlavaLlamaForCausalLM.from_pretrained(LLM)`` then
``initialize_vision_modules(pretrain_mm_mlp_adapter=mm_projector.bin)`` (``CLIPVisionTower``,
``mm_vision_select_layer``, ``select_feature patch``, ``build_vision_projector``). Images are
opened as upstream's dataset does and preprocessed by ``llava.mm_utils.process_images`` with
``--image_aspect_ratio`` (stage 1: ``square``; upstream stage 2: ``pad``); the features are
``model.encode_images`` (vision tower -> projector). Upstream's trainer casts the vision tower to
fp16/bf16; here everything runs in ``--dtype`` (default float32) so results can be compared.

Writes a safetensors file with ``pixel_values`` [N, 3, H, W], ``vision_features`` [N, P, C]
(tower output, before the projector) and ``image_features`` [N, P, D], and in its metadata the
image list and settings (JSON)::

    python -m llava_contrastive.hosts.llava.image_features --model_name_or_path LLM --vision_tower CLIP \\
        --projector mm_projector.bin --image_folder DIR --images a.jpg b.jpg --out feats.safetensors
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_upstream_model(model_name_or_path: str, vision_tower: str, projector: str,
                         projector_type: str = "mlp2x_gelu", select_layer: int = -2,
                         select_feature: str = "patch", image_aspect_ratio: str = "square",
                         dtype: torch.dtype = torch.float32):
    """Upstream ``LlavaLlamaForCausalLM`` with its vision tower and the stage-1 projector, loaded
    through upstream's ``initialize_vision_modules(pretrain_mm_mlp_adapter=...)``."""
    from llava_contrastive.hosts.llava.compat import LlavaLlamaForCausalLM

    model = LlavaLlamaForCausalLM.from_pretrained(model_name_or_path, torch_dtype=dtype)
    model_args = argparse.Namespace(
        vision_tower=vision_tower, mm_vision_select_layer=select_layer, mm_vision_select_feature=select_feature,
        pretrain_mm_mlp_adapter=projector, mm_patch_merge_type="flat", mm_projector_type=projector_type)
    model.get_model().initialize_vision_modules(model_args=model_args, fsdp=None)
    model.get_vision_tower().to(dtype=dtype)  # upstream: fp16 / bf16; here the requested dtype
    model.get_model().mm_projector.to(dtype=dtype)
    model.config.image_aspect_ratio = image_aspect_ratio
    return model.eval()


def image_features(model, image_folder: str, images: Sequence[str]) -> Dict[str, torch.Tensor]:
    """pixel_values, vision_features (tower) and image_features (tower -> projector) of ``images``."""
    from PIL import Image

    from llava_contrastive.hosts.llava.compat import import_upstream

    process_images = import_upstream("mm_utils").process_images
    tower = model.get_vision_tower()
    pil = [Image.open(os.path.join(image_folder, f)).convert("RGB") for f in images]  # as upstream's dataset
    pixel_values = process_images(pil, tower.image_processor, model.config)
    if isinstance(pixel_values, list):
        raise ValueError("images preprocess to different shapes; use one size per call")
    dtype = next(model.get_model().mm_projector.parameters()).dtype
    with torch.no_grad():
        vision = tower(pixel_values.to(dtype))
        feats = model.encode_images(pixel_values.to(dtype))
    return {"pixel_values": pixel_values.contiguous(), "vision_features": vision.contiguous(),
            "image_features": feats.contiguous()}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_name_or_path", required=True, help="the stage-1 LLM")
    p.add_argument("--vision_tower", required=True)
    p.add_argument("--projector", required=True, help="mm_projector.bin (upstream keys)")
    p.add_argument("--image_folder", required=True)
    p.add_argument("--images", nargs="+", required=True, help="paths relative to --image_folder")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--mm_projector_type", default="mlp2x_gelu")
    p.add_argument("--mm_vision_select_layer", type=int, default=-2)
    p.add_argument("--mm_vision_select_feature", default="patch")
    p.add_argument("--image_aspect_ratio", default="square", help="square (stage 1) | pad (stage 2)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    return p.parse_args(argv)


def run(argv: Optional[Sequence[str]] = None) -> Path:
    from safetensors.torch import save_file

    a = parse_args(argv)
    torch.manual_seed(0)
    model = build_upstream_model(a.model_name_or_path, a.vision_tower, a.projector, a.mm_projector_type,
                                 a.mm_vision_select_layer, a.mm_vision_select_feature, a.image_aspect_ratio,
                                 DTYPES[a.dtype])
    tensors = image_features(model, a.image_folder, a.images)
    meta: Dict[str, str] = {"images": json.dumps(list(a.images)), "settings": json.dumps(
        {k: v for k, v in vars(a).items() if k not in ("images", "out")})}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=meta)
    shapes: List[str] = [f"{k} {tuple(v.shape)}" for k, v in tensors.items()]
    print(f"wrote {out}: {', '.join(shapes)}")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
