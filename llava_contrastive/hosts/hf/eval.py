"""Held-out image-text alignment on transformers' native LLaVA: ``python -m llava_contrastive.hosts.hf.eval``.

The native host's counterpart of ``python -m llava_contrastive.evaluation.alignment``: same metrics (recall@1/5/10
both ways with duplicate captions masked, modality gap, positive / negative cosine, held-out NTP
loss), same ``report.json`` keys, figures and console report -- everything host-agnostic is imported
from ``llava_contrastive.evaluation.alignment``; only the model and the data are native here::

    # a native checkpoint (hosts.hf.train output, or convert.py build), its own projector
    python -m llava_contrastive.hosts.hf.eval --model_name_or_path out \\
        --data_path heldout.json --image_folder images --output_dir out/eval --max_samples 5000
    # any stage-1 projector (upstream mm_projector.bin, native projector keys, a run / checkpoint dir)
    python -m llava_contrastive.hosts.hf.eval --llm_dir LLM --vision_dir CLIP --projector run_dir ...

The pair embeddings are those the contrastive term scores (``embed_pairs``): the ``--contrastive_*``
flags, defaulting to the run's ``contrastive_config.json``, else the defaults. The trained head
(``contrastive_head.safetensors``) is loaded when its shape fits those settings, with the code the
upstream host's evaluation uses. Everything runs in float32.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from llava_contrastive.evaluation import alignment as ev
from llava_contrastive.training.checkpointing import load_head

HEAD_PREFIX = "contrastive_head."  # the head's weights inside a native checkpoint


# ---- projector and settings files ----------------------------------------------------------------
def _native_weight_files(directory: Path) -> list:
    return sorted(directory.glob("model*.safetensors"))


def resolve_projector(projector: str) -> tuple[Path, Optional[Path]]:
    """(projector source, run directory) from: a projector file (upstream ``mm_projector.bin`` or
    native keys, .bin / .safetensors), a directory holding ``mm_projector.bin`` (a run, or its last
    ``checkpoint-N``), or a native checkpoint directory (``model*.safetensors``, or its last
    ``checkpoint-N``). The source is a file or, for a native checkpoint, that directory."""
    p = Path(projector)
    try:
        return ev.resolve_projector(projector)
    except FileNotFoundError:
        if not p.is_dir():
            raise
    if _native_weight_files(p):
        return p, p
    ckpts = sorted((c for c in p.glob("checkpoint-*") if c.name.split("-")[-1].isdigit() and _native_weight_files(c)),
                   key=lambda c: int(c.name.split("-")[-1]))
    if not ckpts:
        raise FileNotFoundError(f"{p}: no {ev.PROJECTOR_FILE}, no native model*.safetensors "
                                f"(nor in checkpoint-*/)")
    return ckpts[-1], ckpts[-1]


def projector_state(source: Path) -> Dict[str, Any]:
    """The projector weights of ``source`` (upstream or native keys, nothing else)."""
    from llava_contrastive.hosts.hf import convert

    if source.is_dir():
        from safetensors import safe_open

        state = {}
        for f in _native_weight_files(source):
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    if "multi_modal_projector." in k:
                        state[k] = fh.get_tensor(k)
        if not state:
            raise ValueError(f"{source}: no multi_modal_projector weights in model*.safetensors")
        return state
    try:
        state = convert.load_state(source)
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"{source}: not a readable projector file ({err})") from err
    return {k: v for k, v in state.items() if "mm_projector." in k or "multi_modal_projector." in k}


# ---- model and data ------------------------------------------------------------------------------
def load_native(model_name_or_path: str):
    """``from_pretrained`` in float32, strictly (every weight of the model loaded), without building
    the checkpoint's own contrastive head: evaluation builds its head from the evaluated settings."""
    import torch
    import transformers
    from transformers import AutoConfig

    from llava_contrastive.hosts.hf.model import ContrastiveLlavaForConditionalGeneration

    config = AutoConfig.from_pretrained(str(model_name_or_path))
    if hasattr(config, "contrastive"):
        del config.contrastive
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the head's weights are reported UNEXPECTED: checked below
    try:
        model, info = ContrastiveLlavaForConditionalGeneration.from_pretrained(
            str(model_name_or_path), config=config, dtype=torch.float32, output_loading_info=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
    bad = {k: sorted(v) for k, v in (("missing", info.get("missing_keys", ())), ("mismatched", info.get(
        "mismatched_keys", ())), ("unexpected", [u for u in info.get("unexpected_keys", ())
                                                 if not u.startswith(HEAD_PREFIX)])) if v}
    if bad:
        raise ValueError(f"{model_name_or_path}: not a complete native LLaVA checkpoint ({bad})")
    return model


def build_model(model_name_or_path: Optional[str], llm_dir: Optional[str], vision_dir: Optional[str],
                projector_source: Optional[Path], vision_feature_layer: Optional[int]):
    """(native model in float32, frozen, processor); the projector replaced by ``projector_source``."""
    import torch

    from llava_contrastive.hosts.hf import convert
    from llava_contrastive.hosts.hf.model import ContrastiveLlavaForConditionalGeneration

    if model_name_or_path:
        from transformers import AutoProcessor

        model = load_native(model_name_or_path)
        processor = AutoProcessor.from_pretrained(str(model_name_or_path))
        if vision_feature_layer is not None:
            model.config.vision_feature_layer = vision_feature_layer
        if projector_source is not None:
            try:
                convert.load_projector(model, projector_state(projector_source))
            except (KeyError, RuntimeError, ValueError) as err:
                raise ValueError(f"{projector_source}: does not fit the native "
                                 f"{convert.native_projector_type(model.config)} projector of this LLM / "
                                 f"vision tower ({err})") from err
    elif llm_dir and vision_dir:
        if projector_source is None:
            raise ValueError("--llm_dir/--vision_dir build a fresh projector: pass --projector")
        layer = -2 if vision_feature_layer is None else vision_feature_layer  # upstream's mm_vision_select_layer
        try:  # the projector's keys decide its type (linear or mlp2x_gelu)
            model, processor = convert.build_native_llava(llm_dir, vision_dir, None, vision_feature_layer=layer,
                                                          model_class=ContrastiveLlavaForConditionalGeneration,
                                                          projector=projector_state(projector_source))
        except (KeyError, RuntimeError) as err:
            raise ValueError(f"{projector_source}: does not fit a native projector of this LLM / vision tower "
                             f"({err})") from err
    else:
        raise ValueError("give --model_name_or_path (a native checkpoint), or --llm_dir and --vision_dir")
    model.config.use_cache = False
    model.to(torch.float32)
    model.requires_grad_(False)
    return model, processor


def build_data(data_path: str, image_folder: str, processor, image_seq_length: int, max_length: int,
               max_samples: Optional[int]):
    from llava_contrastive.hosts.hf.data import Collator, PretrainDataset

    dataset = PretrainDataset(data_path, image_folder, processor, image_seq_length=image_seq_length,
                              max_length=max_length)
    if max_samples is not None and max_samples < len(dataset.records):
        dataset.records = dataset.records[:max_samples]
    return dataset, Collator(processor.tokenizer.pad_token_id)


# ---- entry points --------------------------------------------------------------------------------
def evaluate(data_path: str, image_folder: str, model_name_or_path: Optional[str] = None,
             llm_dir: Optional[str] = None, vision_dir: Optional[str] = None, projector: Optional[str] = None,
             output_dir: Optional[str] = None, head: Optional[str] = None, max_samples: Optional[int] = None,
             batch_size: int = 64, trainer_state: Optional[str] = None, vision_feature_layer: Optional[int] = None,
             model_max_length: int = 2048, contrastive: Optional[Dict[str, Any]] = None, figures: bool = True,
             progress: bool = True, return_embeddings: bool = False,
             baseline: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Evaluate a native model (its own projector, or ``projector``) on held-out pairs; returns the
    report dict of ``llava_contrastive.evaluation.alignment.evaluate`` (also written to ``output_dir/report.json``).
    ``model_max_length`` counts the image tokens (upstream truncates after splicing them in too)."""
    import torch

    t0 = time.time()
    torch.manual_seed(0)
    if projector:
        projector_source, run_dir = resolve_projector(projector)
    elif model_name_or_path:
        projector_source, run_dir = None, Path(model_name_or_path)
    else:
        raise ValueError("--llm_dir/--vision_dir build a fresh projector: pass --projector")
    cargs, head_dir = ev.settings_and_head(run_dir, head, contrastive)
    model, processor = build_model(model_name_or_path, llm_dir, vision_dir, projector_source, vision_feature_layer)
    model.init_contrastive(cargs, processor.tokenizer)
    head_loaded = None
    if head_dir is not None and (head_dir / ev.HEAD_FILE).is_file():  # shape checked by settings_and_head
        load_head(model, str(head_dir), for_evaluation=True)
        head_loaded = str(head_dir / ev.HEAD_FILE)
    if head_loaded is None and cargs.contrastive_head != "none":
        raise FileNotFoundError(f"--contrastive_head {cargs.contrastive_head} needs the trained head "
                                f"({ev.HEAD_FILE}): pass --head DIR")
    model.eval()
    if model_max_length < model.config.image_seq_length + 2:
        raise ValueError(f"--model_max_length {model_max_length} counts the {model.config.image_seq_length} image "
                         "tokens and bos and leaves no room for the caption: raise it (upstream trains with 2048)")

    dataset, collator = build_data(data_path, image_folder, processor, model.config.image_seq_length,
                                   model_max_length, max_samples)
    emb = ev.embed_dataset(model, dataset, collator, batch_size=batch_size, progress=progress,
                           image_key="pixel_values")
    from llava_contrastive.hosts.hf.convert import native_projector_type

    settings = {"mm_projector_type": native_projector_type(model.config),
                "mm_vision_select_layer": model.config.vision_feature_layer,
                "batch_size": batch_size, "max_samples": max_samples, "model_max_length": model_max_length,
                "host": "hf", "vocab_size": model.config.text_config.vocab_size}
    paths = {"model_name_or_path": str(model_name_or_path or llm_dir),
             "vision_tower": str(vision_dir or model_name_or_path),
             "projector": str(projector_source or model_name_or_path), "head": head_loaded,
             "data_path": str(data_path), "image_folder": str(image_folder)}
    return ev.finish_report(emb, cargs, settings, paths, run_dir=run_dir, trainer_state=trainer_state,
                            output_dir=output_dir, figures=figures, t0=t0, return_embeddings=return_embeddings,
                            baseline=baseline)


def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_name_or_path", default=None,
                   help="native LLaVA checkpoint (hosts.hf.train output, convert.py build); or --llm_dir/--vision_dir")
    p.add_argument("--llm_dir", default=None, help="build the native model from this Llama ...")
    p.add_argument("--vision_dir", default=None, help="... and this CLIP or SigLIP vision tower (needs --projector)")
    p.add_argument("--projector", default=None,
                   help="mm_projector.bin / native projector file, a run or checkpoint dir "
                        "(default: the checkpoint's own)")
    p.add_argument("--vision_feature_layer", type=int, default=None,
                   help="CLIP layer of the image features (default: the checkpoint's, else -2 as upstream)")
    ev.add_shared_args(p)
    a = p.parse_args(argv)
    if not a.model_name_or_path and not (a.llm_dir and a.vision_dir):
        p.error("give --model_name_or_path, or --llm_dir and --vision_dir")
    if a.model_name_or_path and (a.llm_dir or a.vision_dir):
        p.error("--model_name_or_path excludes --llm_dir/--vision_dir")
    if not a.model_name_or_path and not a.projector:
        p.error("--llm_dir/--vision_dir need --projector")
    return a


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    a = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report = evaluate(a.data_path, a.image_folder, model_name_or_path=a.model_name_or_path, llm_dir=a.llm_dir,
                      vision_dir=a.vision_dir, projector=a.projector, vision_feature_layer=a.vision_feature_layer,
                      **ev.shared_evaluate_kwargs(a))
    ev.print_report(report, a.output_dir)
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
