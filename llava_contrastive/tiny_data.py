"""Synthetic compositional scenes, captions and LLaVA-format records for the tiny assets.

Every scene is a 64x64 RGB image with 1-3 objects, each in its own quadrant of the image.
An object is (colour, shape, size, quadrant); captions describe the whole composition with
varied templates, so retrieval needs every attribute of every object, not a single one.

Everything here is pure python + PIL and deterministic for a ``random.Random`` seed.
"""
from __future__ import annotations

import io
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from PIL import Image, ImageDraw

IMAGE_SIZE = 64
_SUPERSAMPLE = 2
JPEG_QUALITY = 90

COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (35, 170, 55),
    "blue": (35, 70, 225),
    "yellow": (240, 220, 35),
    "purple": (145, 50, 175),
    "orange": (250, 140, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
COLOR_NAMES: List[str] = list(COLORS)
SHAPES: List[str] = ["circle", "square", "triangle", "cross", "diamond", "ring"]
SIZES: List[str] = ["small", "large"]
# quadrant index -> (words, (row, col))
POSITIONS: List[str] = ["top left", "top right", "bottom left", "bottom right"]
_POS_RC = {0: (0, 0), 1: (0, 1), 2: (1, 0), 3: (1, 1)}

_COUNT_WORDS = {1: "one", 2: "two", 3: "three"}

# LLaVA-style brief-description prompts (stage-1 "human" turn, followed by "\n<image>").
PRETRAIN_PROMPTS: List[str] = [
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
]


@dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    size: str
    pos: int  # quadrant index into POSITIONS

    @property
    def desc(self) -> str:
        return f"{self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: Tuple[Obj, ...]
    bg: Tuple[int, int, int]
    jitter: Tuple[Tuple[int, int, int], ...]  # per object (dx, dy, dr) in supersampled px

    @property
    def signature(self) -> Tuple[Tuple[str, str, str, int], ...]:
        return tuple(sorted((o.color, o.shape, o.size, o.pos) for o in self.objects))


# ----------------------------------------------------------------------------- sampling


def sample_scene(rng: random.Random) -> Scene:
    n = rng.choices([1, 2, 3], weights=[0.15, 0.4, 0.45])[0]
    quads = rng.sample(range(4), n)
    objs = tuple(
        Obj(rng.choice(COLOR_NAMES), rng.choice(SHAPES), rng.choice(SIZES), q) for q in sorted(quads)
    )
    g = rng.randint(100, 160)
    bg = tuple(max(0, min(255, g + rng.randint(-14, 14))) for _ in range(3))
    s = _SUPERSAMPLE
    jitter = tuple((rng.randint(-3 * s, 3 * s), rng.randint(-3 * s, 3 * s), rng.randint(-1 * s, 1 * s)) for _ in objs)
    return Scene(objs, bg, jitter)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- drawing


def _draw_object(d: ImageDraw.ImageDraw, o: Obj, jit: Tuple[int, int, int]) -> None:
    s = _SUPERSAMPLE
    half = IMAGE_SIZE * s // 2
    row, col = _POS_RC[o.pos]
    cx = col * half + half // 2 + jit[0]
    cy = row * half + half // 2 + jit[1]
    r = (11 if o.size == "large" else 6) * s + jit[2]
    fill = COLORS[o.color]
    if o.shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif o.shape == "ring":
        w = max(2, int(r * 0.38))
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=w)
    elif o.shape == "square":
        h = int(r * 0.85)
        d.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif o.shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + int(r * 0.8)), (cx - r, cy + int(r * 0.8))], fill=fill)
    elif o.shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif o.shape == "cross":
        t = max(2, int(r * 0.33))
        d.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        d.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    else:  # pragma: no cover
        raise ValueError(o.shape)


def render_scene(scene: Scene) -> Image.Image:
    big = IMAGE_SIZE * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), scene.bg)
    d = ImageDraw.Draw(img)
    for o, j in zip(scene.objects, scene.jitter):
        _draw_object(d, o, j)
    return img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS)


def jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


# ----------------------------------------------------------------------------- captions


def _pos_phrase(rng: random.Random, pos: int) -> str:
    p = POSITIONS[pos]
    return rng.choice([f"at the {p}", f"in the {p}", f"in the {p} corner", f"at the {p} corner"])


def _join(parts: Sequence[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


N_TEMPLATES = 10


def caption_scene(rng: random.Random, scene: Scene) -> str:
    objs = list(scene.objects)
    rng.shuffle(objs)
    n = len(objs)
    t = rng.randrange(N_TEMPLATES)
    full = [f"a {o.desc} {_pos_phrase(rng, o.pos)}" for o in objs]
    L = _join(full)
    plural = "s" if n > 1 else ""
    if t == 0:
        return f"{L}."
    if t == 1:
        if n == 1:
            return f"there is {full[0]}."
        return f"there is {full[0]} next to {_join(full[1:])}."
    if t == 2:
        return f"{_COUNT_WORDS[n]} shape{plural}: {L}."
    if t == 3:
        return f"an image showing {L} on a grey background."
    if t == 4:
        return f"a picture with {L}."
    if t == 5:
        return f"we can see {L}."
    if t == 6:
        return f"a simple drawing of {L}."
    if t == 7:
        return "; ".join(f"{POSITIONS[o.pos]}: a {o.desc}" for o in objs) + "."
    if t == 8:
        return f"{_COUNT_WORDS[n]} object{plural} on a plain background: {L}."
    return f"the scene contains {L}."


# ----------------------------------------------------------------------------- records


def pretrain_image_rel(idx: int) -> str:
    return f"{idx // 1000:05d}/{idx:09d}.jpg"


def pretrain_record(idx: int, prompt: str, caption: str) -> dict:
    return {
        "id": f"{idx:09d}",
        "image": pretrain_image_rel(idx),
        "conversations": [
            {"from": "human", "value": f"{prompt}\n<image>"},
            {"from": "gpt", "value": caption},
        ],
    }


def _unique_shape_objs(scene: Scene) -> List[Obj]:
    shapes = [o.shape for o in scene.objects]
    return [o for o in scene.objects if shapes.count(o.shape) == 1]


def _image_qa(rng: random.Random, scene: Scene) -> List[Tuple[str, str]]:
    """Candidate (question, answer) pairs about a scene."""
    qa: List[Tuple[str, str]] = []
    objs = list(scene.objects)
    n = len(objs)
    colour = rng.choice(["colour", "color"])
    for o in _unique_shape_objs(scene):
        qa.append((f"What {colour} is the {o.shape}?", f"It is {o.color}."))
    keys = [(ob.color, ob.shape) for ob in objs]
    named = [ob for ob in objs if keys.count((ob.color, ob.shape)) == 1]  # unambiguous "the red circle"
    if named:
        o = rng.choice(named)
        qa.append((f"Is the {o.color} {o.shape} small or large?", f"It is {o.size}."))
        o = rng.choice(named)
        qa.append((f"Where is the {o.color} {o.shape}?", f"It is in the {POSITIONS[o.pos]} corner."))
    q = rng.randrange(4)
    occ = {ob.pos: ob for ob in objs}
    if q in occ:
        qa.append((f"What is in the {POSITIONS[q]} corner?", f"A {occ[q].desc}."))
    else:
        qa.append((f"What is in the {POSITIONS[q]} corner?", f"Nothing, the {POSITIONS[q]} corner is empty."))
    qa.append(
        ("How many shapes are there?", "There is one shape." if n == 1 else f"There are {_COUNT_WORDS[n]} shapes.")
    )
    qa.append(("Describe the image briefly.", caption_scene(rng, scene)))
    return qa


_SIDES = {"triangle": "three", "square": "four", "diamond": "four"}
_MIX = [("red", "yellow", "orange"), ("red", "blue", "purple"), ("blue", "yellow", "green"), ("black", "white", "grey")]


def _text_qa(rng: random.Random) -> List[Tuple[str, str]]:
    qa: List[Tuple[str, str]] = []
    s = rng.choice(list(_SIDES))
    qa.append((f"How many sides does a {s} have?", f"A {s} has {_SIDES[s]} sides."))
    a, b, c = rng.choice(_MIX)
    colour = rng.choice(["colour", "color"])
    qa.append((f"What {colour} do you get by mixing {a} and {b}?", f"Mixing {a} and {b} gives {c}."))
    qa.append(("Is a ring filled?", "No, a ring is a circle with an empty centre."))
    qa.append(("What does a cross look like?", "A cross is made of two bars that meet in the middle."))
    sh = rng.choice(SHAPES)
    qa.append((f"Which is bigger, a large {sh} or a small {sh}?", f"The large {sh} is bigger."))
    qa.append(("Does a circle have corners?", "No, a circle has no corners."))
    return qa


def instruct_image_rel(idx: int) -> str:
    return f"coco/train2017/{idx:012d}.jpg"


def instruct_record_image(rng: random.Random, idx: int, scene: Scene) -> dict:
    qa = _image_qa(rng, scene)
    k = rng.choice([2, 2, 3])
    chosen = rng.sample(qa, k)
    conv = []
    for t, (q, a) in enumerate(chosen):
        conv.append({"from": "human", "value": f"<image>\n{q}" if t == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return {"id": f"{idx:012d}", "image": instruct_image_rel(idx), "conversations": conv}


def instruct_record_text(rng: random.Random, idx: int) -> dict:
    chosen = rng.sample(_text_qa(rng), 2)
    conv = []
    for q, a in chosen:
        conv.append({"from": "human", "value": q})
        conv.append({"from": "gpt", "value": a})
    return {"id": f"text_{idx:06d}", "conversations": conv}


# ----------------------------------------------------------------------------- dataset generation


@dataclass
class GeneratedData:
    train_records: List[dict]
    heldout_records: List[dict]
    instruct_records: List[dict]
    # image bytes keyed by path relative to the data root (decoded later for vision pretraining)
    train_jpegs: List[bytes]
    train_scenes: List[Scene]


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")


def generate_data(
    data_root: Path,
    seed: int,
    n_train: int,
    n_heldout: int,
    n_instruct: int,
    text_only_frac: float = 0.1,
) -> GeneratedData:
    """Draw, caption and write all images and the three JSON files under ``data_root``."""
    data_root = Path(data_root)
    pre = data_root / "LLaVA-Pretrain"
    img_root = pre / "images"
    rng = random.Random(f"tiny-train-{seed}")

    train, train_jpegs, train_scenes = [], [], []
    seen = set()
    for i in range(n_train):
        sc = sample_scene(rng)
        seen.add(sc.signature)
        cap = caption_scene(rng, sc)
        rec = pretrain_record(i, rng.choice(PRETRAIN_PROMPTS), cap)
        jb = jpeg_bytes(render_scene(sc))
        _write(img_root / rec["image"], jb)
        train.append(rec)
        train_jpegs.append(jb)
        train_scenes.append(sc)
    train_caps = {r["conversations"][1]["value"] for r in train}

    # held-out: scenes (hence captions) never seen in train, and unique among themselves
    rng_h = random.Random(f"tiny-heldout-{seed}")
    heldout = []
    base = 10 ** (len(str(max(n_train, 1))))  # ids disjoint from train ids
    base = max(base, 100000)
    i = 0
    while len(heldout) < n_heldout:
        sc = sample_scene(rng_h)
        if sc.signature in seen:
            continue
        cap = caption_scene(rng_h, sc)
        if cap in train_caps:
            continue
        seen.add(sc.signature)
        idx = base + i
        i += 1
        rec = pretrain_record(idx, rng_h.choice(PRETRAIN_PROMPTS), cap)
        _write(img_root / rec["image"], jpeg_bytes(render_scene(sc)))
        heldout.append(rec)

    # stage-2 instruction mix (llava_v1_5_mix665k.json format)
    rng_i = random.Random(f"tiny-instruct-{seed}")
    instruct = []
    for j in range(n_instruct):
        if rng_i.random() < text_only_frac:
            instruct.append(instruct_record_text(rng_i, j))
        else:
            sc = sample_scene(rng_i)
            rec = instruct_record_image(rng_i, j, sc)
            _write(data_root / rec["image"], jpeg_bytes(render_scene(sc)))
            instruct.append(rec)

    write_json(pre / "blip_laion_cc_sbu_558k.json", train)
    write_json(pre / "heldout.json", heldout)
    write_json(data_root / "llava_v1_5_mix665k.json", instruct)
    return GeneratedData(train, heldout, instruct, train_jpegs, train_scenes)


def tokenizer_corpus(gen: GeneratedData) -> List[str]:
    """Texts the SentencePiece model is trained on (deterministic order)."""
    texts = list(PRETRAIN_PROMPTS)
    texts += [r["conversations"][1]["value"] for r in gen.train_records]
    for r in gen.instruct_records:
        texts += [c["value"].replace("<image>\n", "") for c in r["conversations"]]
    return texts


def lm_corpus(gen: GeneratedData) -> List[str]:
    """Caption-like texts the tiny LLM is pretrained on (stage-1 target format: caption + '\\n')."""
    texts = [r["conversations"][1]["value"] + "\n" for r in gen.train_records]
    for r in gen.instruct_records:
        texts += [c["value"] + "\n" for c in r["conversations"] if c["from"] == "gpt"]
    return texts


def vision_targets(scene: Scene) -> Tuple[List[int], List[int], List[int]]:
    """Per-quadrant class targets: colour (0 = empty, 1..8), shape (0 = empty, 1..6), size (0, 1..2)."""
    col, shp, siz = [0] * 4, [0] * 4, [0] * 4
    for o in scene.objects:
        col[o.pos] = 1 + COLOR_NAMES.index(o.color)
        shp[o.pos] = 1 + SHAPES.index(o.shape)
        siz[o.pos] = 1 + SIZES.index(o.size)
    return col, shp, siz
