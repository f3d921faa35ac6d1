"""Shared by the data-check tests: fake stage-1 records and undecodable-looking images."""
from __future__ import annotations

import io
import json
import random

from PIL import Image


def record(rid, image, caption="a red square on a grey background.", prompt="Describe the image.\n<image>"):
    rec = {"id": rid, "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": caption}]}
    if image is not None:
        rec["image"] = image
    return rec


def noise_jpeg(size=160, seed=0) -> bytes:
    rnd = random.Random(seed)
    im = Image.frombytes("RGB", (size, size), bytes(rnd.getrandbits(8) for _ in range(size * size * 3)))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def write_corpus(path, good: list, bad: dict, every: int) -> dict:
    """Write ``good`` records with the ``bad`` ones ({key: (record, expected reason)}) interleaved,
    one after every ``every`` good records, as JSON to ``path``; return {key: expected reason}."""
    out = list(good)
    for k, (rec, _) in enumerate(bad.values()):
        out.insert(every * k + 1, rec)
    path.write_text(json.dumps(out))
    return {k: reason for k, (_, reason) in bad.items()}
