"""Held-out image-text alignment of a stage-1 projector on the upstream host:
``llava-contrastive eval`` (= ``python -m llava_contrastive.eval``).

The model and the data are upstream's (``LazySupervisedDataset`` with the plain template, the
contrastive subclass for the embeddings); every metric, figure and the report come from the
host-agnostic ``llava_contrastive.evaluation.alignment``::

    llava-contrastive eval --model_name_or_path LLM --vision_tower CLIP --projector RUN_DIR \
        --data_path heldout.json --image_folder images --output_dir RUN_DIR/eval
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from llava_contrastive.core.config import ContrastiveArguments
from llava_contrastive.evaluation.alignment import (HEAD_FILE, add_shared_args, embed_dataset, shared_evaluate_kwargs,
                                                    finish_report, infer_projector_type, print_report,
                                                    projector_weights, resolve_projector, settings_and_head)


def build_model(model_name_or_path: str, vision_tower: str, projector_file: Path, projector_type: str,
                select_layer: int, cargs: ContrastiveArguments, model_max_length: int, head_dir: Optional[Path]):
    import torch
    import transformers

    from llava_contrastive.hosts.llava.checkpoint import load_head, load_projector_state
    from llava_contrastive.hosts.llava.model import ContrastiveLlavaAutoForCausalLM

    tokenizer = transformers.AutoTokenizer.from_pretrained(
        model_name_or_path, model_max_length=model_max_length, padding_side="right", use_fast=False)
    tokenizer.pad_token = tokenizer.unk_token  # upstream, --version plain
    model = ContrastiveLlavaAutoForCausalLM.from_pretrained(model_name_or_path, torch_dtype=torch.float32)
    model.config.use_cache = False
    model_args = argparse.Namespace(
        vision_tower=vision_tower, mm_vision_select_layer=select_layer, mm_vision_select_feature="patch",
        pretrain_mm_mlp_adapter=None, mm_patch_merge_type="flat", mm_projector_type=projector_type)
    model.get_model().initialize_vision_modules(model_args=model_args, fsdp=None)
    state = projector_weights(load_projector_state(str(projector_file)))
    try:
        model.get_model().mm_projector.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{projector_file}: does not fit --mm_projector_type {projector_type} with this "
                         f"LLM / vision tower ({err})") from err
    vt = model.get_vision_tower()
    model.config.image_aspect_ratio = "square"
    model.config.tokenizer_padding_side = tokenizer.padding_side
    model.config.tokenizer_model_max_length = tokenizer.model_max_length
    model.config.mm_use_im_start_end = False
    model.config.mm_use_im_patch_token = False
    model.requires_grad_(False)
    model.init_contrastive(cargs, tokenizer)
    head_loaded = None
    if head_dir is not None and (head_dir / HEAD_FILE).is_file():
        load_head(model, str(head_dir), for_evaluation=True)
        head_loaded = str(head_dir / HEAD_FILE)
    elif cargs.contrastive_head != "none":
        raise FileNotFoundError(f"--contrastive_head {cargs.contrastive_head} needs the trained head "
                                f"({HEAD_FILE}): pass --head DIR")
    model.eval()
    return model, tokenizer, vt.image_processor, head_loaded

def build_data(data_path: str, image_folder: str, tokenizer, image_processor, max_samples: Optional[int]):
    import llava.conversation as conversation_lib
    from llava.train import train as upstream

    conversation_lib.default_conversation = conversation_lib.conv_templates["plain"]
    data_args = upstream.DataArguments(data_path=data_path, lazy_preprocess=True, is_multimodal=True,
                                       image_folder=image_folder, image_aspect_ratio="square")
    data_args.image_processor = image_processor
    data_args.mm_use_im_start_end = False
    dataset = upstream.LazySupervisedDataset(data_path=data_path, tokenizer=tokenizer, data_args=data_args)
    if max_samples is not None and max_samples < len(dataset.list_data_dict):
        dataset.list_data_dict = dataset.list_data_dict[:max_samples]
    return dataset, upstream.DataCollatorForSupervisedDataset(tokenizer=tokenizer)

def evaluate(model_name_or_path: str, vision_tower: str, projector: str, data_path: str, image_folder: str,
             output_dir: Optional[str] = None, head: Optional[str] = None, max_samples: Optional[int] = None,
             batch_size: int = 64, trainer_state: Optional[str] = None, mm_projector_type: str = "auto",
             mm_vision_select_layer: int = -2, model_max_length: int = 2048,
             contrastive: Optional[Dict[str, Any]] = None, figures: bool = True, progress: bool = True,
             return_embeddings: bool = False, baseline: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Evaluate a projector on held-out pairs; returns the report dict (also written to
    ``output_dir/report.json`` when given). ``contrastive``: ContrastiveArguments overrides."""
    import torch

    t0 = time.time()
    torch.manual_seed(0)
    projector_file, run_dir = resolve_projector(projector)
    cargs, head_dir = settings_and_head(run_dir, head, contrastive)
    state = None
    if mm_projector_type == "auto":
        from llava_contrastive.hosts.llava.checkpoint import load_projector_state

        state = load_projector_state(str(projector_file))
        mm_projector_type = infer_projector_type(state, run_dir)
    model, tokenizer, processor, head_loaded = build_model(
        model_name_or_path, vision_tower, projector_file, mm_projector_type, mm_vision_select_layer, cargs,
        model_max_length, head_dir)
    dataset, collator = build_data(data_path, image_folder, tokenizer, processor, max_samples)
    emb = embed_dataset(model, dataset, collator, batch_size=batch_size, progress=progress)
    settings = {"mm_projector_type": mm_projector_type, "mm_vision_select_layer": mm_vision_select_layer,
                "batch_size": batch_size, "max_samples": max_samples, "model_max_length": model_max_length}
    paths = {"model_name_or_path": str(model_name_or_path), "vision_tower": str(vision_tower),
             "projector": str(projector_file), "head": head_loaded, "data_path": str(data_path),
             "image_folder": str(image_folder)}
    return finish_report(emb, cargs, settings, paths, run_dir=run_dir, trainer_state=trainer_state,
                         output_dir=output_dir, figures=figures, t0=t0, return_embeddings=return_embeddings,
                         baseline=baseline)

def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_name_or_path", required=True, help="base LLM (the stage-1 LLM)")
    p.add_argument("--vision_tower", required=True)
    p.add_argument("--projector", required=True, help="mm_projector.bin or a stage-1 output directory")
    p.add_argument("--mm_projector_type", default="auto", help="auto | linear | mlp2x_gelu | mlpNx_gelu")
    p.add_argument("--mm_vision_select_layer", type=int, default=-2)
    add_shared_args(p)
    return p.parse_args(argv)


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    a = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report = evaluate(a.model_name_or_path, a.vision_tower, a.projector, a.data_path, a.image_folder,
                      mm_projector_type=a.mm_projector_type, mm_vision_select_layer=a.mm_vision_select_layer,
                      **shared_evaluate_kwargs(a))
    print_report(report, a.output_dir)
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
