"""Carve a held-out split from a LLaVA-Pretrain JSON: ``python -m llava_contrastive.data.holdout``.

    python -m llava_contrastive.data.holdout --data_path blip_laion_cc_sbu_558k.json --num_heldout 5000 \
        --seed 0 --out_train train_minus_heldout.json --out_heldout heldout.json

Held-out records are drawn (deterministically from ``--seed``) among records with one image and a
caption, one record per distinct caption; every remaining record whose caption equals a held-out
caption (after whitespace normalisation, case-insensitive) is excluded from the new train file, so
no held-out caption is ever seen in training. Record order is kept in both outputs.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple


def caption_of(record: Dict[str, Any]) -> Optional[str]:
    """The first assistant turn (the caption in LLaVA-Pretrain), or None."""
    for turn in record.get("conversations", []):
        if turn.get("from") in ("gpt", "assistant"):
            return turn.get("value")
    return None


def normalise(caption: str) -> str:
    return " ".join(caption.split()).lower()


def split_records(records: List[Dict[str, Any]], num_heldout: int, seed: int
                  ) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]], Dict[str, int]]:
    """(train, heldout, counts). Deterministic for (records, num_heldout, seed)."""
    if num_heldout < 0:
        raise ValueError("--num_heldout must be >= 0")
    first_of: Dict[str, int] = {}
    for i, r in enumerate(records):
        c = caption_of(r)
        if c is None or not r.get("image"):
            continue
        first_of.setdefault(normalise(c), i)
    candidates = sorted(first_of.values())
    if num_heldout > len(candidates):
        raise ValueError(f"--num_heldout {num_heldout} > {len(candidates)} records with an image and a distinct caption")
    chosen = set(random.Random(seed).sample(candidates, num_heldout))
    held_captions = {normalise(caption_of(records[i])) for i in chosen}
    train, heldout, dropped = [], [], 0
    for i, r in enumerate(records):
        if i in chosen:
            heldout.append(r)
            continue
        c = caption_of(r)
        if c is not None and normalise(c) in held_captions:
            dropped += 1
            continue
        train.append(r)
    counts = {"input": len(records), "train": len(train), "heldout": len(heldout),
              "excluded_duplicate_captions": dropped, "candidates": len(candidates)}
    return train, heldout, counts


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, int]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_path", required=True)
    p.add_argument("--num_heldout", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out_train", required=True)
    p.add_argument("--out_heldout", required=True)
    a = p.parse_args(argv)
    records = json.loads(Path(a.data_path).read_text())
    if not isinstance(records, list):
        sys.exit(f"{a.data_path}: expected a JSON list of records")
    train, heldout, counts = split_records(records, a.num_heldout, a.seed)
    for path, data in ((a.out_train, train), (a.out_heldout, heldout)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=1))
    print(f"holdout: {counts['input']} records -> train {counts['train']}, held-out {counts['heldout']} "
          f"(excluded {counts['excluded_duplicate_captions']} train records sharing a held-out caption; seed {a.seed})")
    print(f"  train:    {a.out_train}\n  held-out: {a.out_heldout}")
    return counts


def main(argv: Optional[Sequence[str]] = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
