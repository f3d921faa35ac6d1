"""Fill a ``--contrastive_text_cache`` ahead of training: ``llava-contrastive text-cache``
(= ``python -m llava_contrastive.hosts.llava.text_cache``).

Reads a LLaVA-Pretrain JSON, tokenises every caption exactly as upstream's ``plain`` template does
in training (``preprocess_plain``: ``<image>`` + caption + ``\\n``, labels mask the image; the
collator's ``model_max_length`` cut; the trailing separator stripped as the model does), and
computes the prompted-LLM text embedding of each distinct caption once, in length-sorted batches,
with the model's own text pass (``ContrastiveModelMixin._live_text_embeddings``), appending to the
cache (``core/text_cache.py``). Resumable: rerun after an interruption and only the missing captions
are computed. On N ranks (``torchrun --nproc_per_node N -m llava_contrastive.hosts.llava.text_cache
...``) each rank computes every N-th distinct caption into its own part file; there is no merge step
(readers take the union of the parts). Training fills any caption still missing on the fly.

Settings must be the training run's (``--model_name_or_path``, ``--contrastive_prompt``,
``--contrastive_text_layer``, ``--contrastive_text_pooling``, and the dtype: ``--bf16 True`` in
training = ``--dtype bfloat16`` here), else training refuses the cache, naming the difference::

    llava-contrastive text-cache --model_name_or_path lmsys/vicuna-7b-v1.5 \\
        --data_path playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json \\
        --contrastive_text_cache cache/vicuna7b-prompteol --dtype bfloat16 --batch_size 256
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
from typing import List, Optional, Sequence

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from llava_contrastive.core.config import ContrastiveArguments

    defaults = ContrastiveArguments()
    p = argparse.ArgumentParser(prog="llava-contrastive text-cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", required=True, help="the LLM of the training run")
    p.add_argument("--data_path", required=True, help="LLaVA-Pretrain-format JSON (records with an image)")
    p.add_argument("--contrastive_text_cache", required=True, help="cache directory (created if missing)")
    p.add_argument("--contrastive_prompt", default=defaults.contrastive_prompt)
    p.add_argument("--contrastive_text_layer", type=int, default=defaults.contrastive_text_layer)
    p.add_argument("--contrastive_text_pooling", default=defaults.contrastive_text_pooling)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="the training run's LLM dtype (--bf16 True: bfloat16; --fp16 True: float16)")
    p.add_argument("--model_max_length", type=int, default=2048, help="the training run's (the collator cuts there)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--max_samples", type=int, default=None, help="only the first N records")
    p.add_argument("--device", default=None, help="default: cuda:<LOCAL_RANK> if CUDA is available, else cpu")
    p.add_argument("--no_progress", action="store_true")
    return p.parse_args(argv)


def plain_caption_ids(records: Sequence[dict], tokenizer, model_max_length: int,
                      separator_ids: torch.Tensor) -> List[List[int]]:
    """Caption token ids per record with an image, as the model sees them in stage-1 training."""
    from llava.train.train import preprocess_plain

    from llava_contrastive.core.pooling import strip_trailing
    from llava_contrastive.hosts.llava.compat import IGNORE_INDEX, IMAGE_TOKEN_INDEX

    out = []
    for r in records:
        if "image" not in r:
            continue  # text-only rows carry no contrastive pair
        d = preprocess_plain([copy.deepcopy(r["conversations"])], tokenizer)
        ids = d["input_ids"][0][:model_max_length].unsqueeze(0)
        labels = d["labels"][0][:model_max_length].unsqueeze(0)
        mask = labels.ne(IGNORE_INDEX) & ids.ne(IMAGE_TOKEN_INDEX)
        mask = strip_trailing(ids, mask, separator_ids)
        out.append(ids[mask].tolist())
    return out


def run(argv: Optional[Sequence[str]] = None) -> dict:
    import transformers
    from llava import conversation

    from llava_contrastive.core.config import ContrastiveArguments
    from llava_contrastive.hosts.llava.model import ContrastiveLlavaAutoForCausalLM

    a = parse(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = a.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

    cargs = ContrastiveArguments(contrastive_text_source="llm", contrastive_prompt=a.contrastive_prompt,
                                 contrastive_text_layer=a.contrastive_text_layer,
                                 contrastive_text_pooling=a.contrastive_text_pooling,
                                 contrastive_text_cache=a.contrastive_text_cache)
    cargs.validate()
    conversation.default_conversation = conversation.conv_templates["plain"]  # as upstream's train(--version plain)
    tok = transformers.AutoTokenizer.from_pretrained(a.model_name_or_path, use_fast=False,
                                                     model_max_length=a.model_max_length, padding_side="right")
    tok.pad_token = tok.unk_token
    model = ContrastiveLlavaAutoForCausalLM.from_pretrained(a.model_name_or_path, torch_dtype=DTYPES[a.dtype])
    model.requires_grad_(False)
    model.to(device).eval()
    model.init_contrastive(cargs, tok)

    with open(a.data_path) as f:
        records = json.load(f)
    if a.max_samples is not None:
        records = records[: a.max_samples]
    captions = plain_caption_ids(records, tok, a.model_max_length, model._separator_ids)

    from llava_contrastive.core.pooling import caption_keys
    from llava_contrastive.core.text_cache import unique_captions

    unique = unique_captions(captions, caption_keys)
    bar = None
    if not a.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(sorted(unique)[rank::world]), desc=f"text cache rank {rank}", unit="caption")
    distinct, computed = model.fill_text_cache(unique, batch_size=a.batch_size,
                                               progress=bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    model.text_cache().close()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    result = {"records": len(records), "captions": len(captions), "distinct": distinct, "computed_here": computed,
              "rank": rank, "world": world, "directory": model.text_cache().directory}
    logging.getLogger("llava_contrastive").info("text cache: %s", result)
    print(json.dumps(result), flush=True)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        run(argv)
    except ValueError as err:  # a refused cache (other model / prompt / layer / pooling) or a bad flag
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
