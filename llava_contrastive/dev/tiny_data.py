"""Synthetic compositional scenes, captions and LLaVA-format records for the tiny assets.

Every scene is a 64x64 RGB image with 1-3 objects, each in its own quadrant of the image.
An object is (colour, shape, size, quadrant); captions describe the whole composition with
varied templates, so retrieval needs every attribute of every object, not a single one.

Everything here is pure python + PIL and deterministic for a ``random.Random`` seed.
"""
from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

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
    # signatures of every scene drawn (stage 1 train + held-out + stage-2 mix): benchmarks avoid them
    signatures: set = field(default_factory=set)


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
            seen.add(sc.signature)
            rec = instruct_record_image(rng_i, j, sc)
            _write(data_root / rec["image"], jpeg_bytes(render_scene(sc)))
            instruct.append(rec)

    write_json(pre / "blip_laion_cc_sbu_558k.json", train)
    write_json(pre / "heldout.json", heldout)
    write_json(data_root / "llava_v1_5_mix665k.json", instruct)
    return GeneratedData(train, heldout, instruct, train_jpegs, train_scenes, set(seen))


# The system prompt of upstream's v1 conversation template (stage 2, VQA): seen often by the tokenizer so
# that it costs few tokens of the tiny LLM's sequence.
V1_SYSTEM_PROMPT = ("A chat between a curious human and an artificial intelligence assistant. The assistant "
                    "gives helpful, detailed, and polite answers to the human's questions.")


def tokenizer_corpus(gen: GeneratedData, instruct_extra: Sequence[dict] = ()) -> List[str]:
    """Texts the SentencePiece model is trained on (deterministic order): stage-1 prompts and captions,
    the instruction turns (``instruct_extra``: the large mix too) and the v1 chat frame."""
    texts = list(PRETRAIN_PROMPTS)
    texts += [r["conversations"][1]["value"] for r in gen.train_records]
    for r in list(gen.instruct_records) + list(instruct_extra):
        texts += [c["value"].replace("<image>", "") for c in r["conversations"]]
    texts += [f"{V1_SYSTEM_PROMPT} USER: ASSISTANT:"] * 200
    # no piece may contain a newline: upstream's plain template ends every caption with a "\n" token
    # of its own (the caption's separator, which the contrastive term strips)
    return [" ".join(x.split("\n")).strip() for x in texts]


def caption_texts(records: Sequence[dict]) -> List[str]:
    """The captions of stage-1 records in the stage-1 target format (caption + '\\n')."""
    return [r["conversations"][1]["value"] + "\n" for r in records]


def lm_texts(train_records: Sequence[dict], instruct_records: Sequence[dict]) -> List[str]:
    """Caption-like texts the tiny LLM is pretrained on: the stage-1 captions, then every answer of the
    instruction records (each + '\\n')."""
    texts = caption_texts(train_records)
    for r in instruct_records:
        texts += [c["value"] + "\n" for c in r["conversations"] if c["from"] == "gpt"]
    return texts


def lm_corpus(gen: GeneratedData) -> List[str]:
    """``lm_texts`` of the generated records."""
    return lm_texts(gen.train_records, gen.instruct_records)


def vision_targets(scene: Scene) -> Tuple[List[int], List[int], List[int]]:
    """Per-quadrant class targets: colour (0 = empty, 1..8), shape (0 = empty, 1..6), size (0, 1..2)."""
    col, shp, siz = [0] * 4, [0] * 4, [0] * 4
    for o in scene.objects:
        col[o.pos] = 1 + COLOR_NAMES.index(o.color)
        shp[o.pos] = 1 + SHAPES.index(o.shape)
        siz[o.pos] = 1 + SIZES.index(o.size)
    return col, shp, siz


# ----------------------------------------------------------------------------- stage-2 large mix
# A larger instruction mix (upstream ``llava_v1_5_mix665k.json`` format) that teaches the answer
# formats the benchmarks use: short answers under upstream's single-word prompt, balanced yes/no,
# A/B/C/D multiple choice under upstream's MMBench prompt, and sentences without a format prompt.
# Colour is supervised heavily (open, yes/no and multiple choice): an earlier run showed colour
# stays at chance after stage 2 unless it is asked often.
#
# The phrasings below are the *training* templates. The benchmarks (evaluation/benchmarks.py) use
# their own held-out phrasings; a test checks that no benchmark question matches any of these.

SHORT_PROMPT = "Answer the question using a single word or phrase."
MC_PROMPT = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCD"
COUNT_WORDS: Dict[int, str] = {0: "zero", 1: "one", 2: "two", 3: "three", 4: "four"}

# kind -> phrasings; placeholders: {colour} (the word colour/color), {c} colour, {s} shape,
# {pos} position words, {size}, {n} count word, {pl} plural s, {a} {b} mixed colours, {thing}
TRAIN_TEMPLATES: Dict[str, List[str]] = {
    "colour": ["What {colour} is the {s}?", "Which {colour} does the {s} have?", "Tell me the {colour} of the {s}.",
               "The {s} is painted in which {colour}?"],
    "colour_at": ["What {colour} is the object in the {pos} corner?", "Name the {colour} of the thing at the {pos}.",
                  "Which {colour} is the shape at the {pos}?"],
    "shape_at": ["What shape is in the {pos} corner?", "Which shape can be seen at the {pos}?",
                 "Name the shape at the {pos}."],
    "size": ["Is the {c} {s} small or large?", "How big is the {c} {s}, small or large?"],
    "where": ["Where is the {c} {s}?", "In which corner is the {c} {s}?"],
    "count": ["How many shapes are there?", "How many objects can you count?", "Count the shapes."],
    "count_colour": ["How many {c} shapes are there?", "Count the {c} objects."],
    "relation": ["What is {rel} the {c} {s}?", "Name the object {rel} the {c} {s}."],
    "yn_exist": ["Does the image contain a {c} {s}?", "Can you see a {c} {s}?", "Is a {c} {s} visible?"],
    "yn_colour": ["Is the {s} coloured {c}?", "Is the colour of the {s} {c}?", "Does the {s} look {c}?"],
    "yn_where": ["Is the {c} {s} located at the {pos}?", "Is the {c} {s} placed in the {pos} corner?"],
    "yn_size": ["Is the {c} {s} a {size} one?", "Would you call the {c} {s} {size}?"],
    "yn_count": ["Does the image show {n} object{pl}?", "Are {n} shape{pl} drawn?"],
    "mc_colour": ["Which {colour} is the {s}?", "Pick the {colour} of the {s} at the {pos}."],
    "mc_shape": ["Which shape is at the {pos}?", "Pick the shape in the {pos} corner."],
    "mc_where": ["In which corner is the {c} {s}?", "Pick the position of the {c} {s}."],
    "mc_count": ["How many objects are drawn?", "Pick the number of shapes."],
    "mc_desc": ["Which option describes the object at the {pos}?", "Pick the description of the {pos} object."],
    "mc_relation": ["Which object is {rel} the {c} {s}?"],
    "mc_caption": ["Which description matches the image?", "Pick the correct description of the image."],
    "describe": ["Describe the image briefly.", "What does the image show?"],
    # text-only world facts
    "sides": ["How many sides does a {s} have?", "Count the sides of a {s}."],
    "corners": ["How many corners does a {s} have?"],
    "mix": ["What {colour} do you get by mixing {a} and {b}?", "Mixing {a} with {b} gives which {colour}?"],
    "filled": ["Is a {s} filled?", "Is the inside of a {s} coloured in?"],
    "bigger": ["Which is bigger, a large {s} or a small {s}?"],
    "thing_colour": ["What {colour} is {thing}?", "Usually, {thing} has which {colour}?"],
    "next_number": ["What number comes after {n}?", "Which number follows {n}?"],
    "opposite": ["Which corner is opposite the {pos} corner?"],
}

# world facts: kind -> list of (slots, short answer, sentence answer)
_THINGS = {"grass": "green", "the sky": "blue", "snow": "white", "coal": "black", "a banana": "yellow",
           "a tomato": "red", "a carrot": "orange", "a plum": "purple"}
_OPPOSITE = {0: 3, 1: 2, 2: 1, 3: 0}


def world_facts() -> Dict[str, List[Tuple[Dict[str, str], str, str]]]:
    """Text-only facts (the instruction set's world knowledge), with short and sentence answers."""
    f: Dict[str, List[Tuple[Dict[str, str], str, str]]] = {k: [] for k in
                                                          ("sides", "corners", "mix", "filled", "bigger",
                                                           "thing_colour", "next_number", "opposite")}
    for s, n in _SIDES.items():
        f["sides"].append(({"s": s}, n, f"A {s} has {n} sides."))
        f["corners"].append(({"s": s}, n, f"A {s} has {n} corners."))
    for s in ("circle", "ring"):
        f["corners"].append(({"s": s}, "zero", f"A {s} has no corners."))
    for a, b, c in _MIX:
        for x, y in ((a, b), (b, a)):
            f["mix"].append(({"a": x, "b": y}, c, f"Mixing {x} and {y} gives {c}."))
    for s in SHAPES:
        filled = "no" if s in ("ring",) else "yes"
        f["filled"].append(({"s": s}, filled, f"{'No' if filled == 'no' else 'Yes'}, a {s} is "
                                              f"{'an outline with an empty centre' if filled == 'no' else 'filled'}."))
        f["bigger"].append(({"s": s}, "large", f"The large {s} is bigger."))
    for thing, c in _THINGS.items():
        f["thing_colour"].append(({"thing": thing}, c, f"{thing[0].upper() + thing[1:]} is {c}."))
    for n in range(0, 4):
        f["next_number"].append(({"n": COUNT_WORDS[n]}, COUNT_WORDS[n + 1], f"{COUNT_WORDS[n + 1].capitalize()} comes after {COUNT_WORDS[n]}."))
    for p, q in _OPPOSITE.items():
        f["opposite"].append(({"pos": POSITIONS[p]}, POSITIONS[q], f"The {POSITIONS[q]} corner is opposite."))
    return f


def named_objs(scene: Scene) -> List[Obj]:
    """Objects whose (colour, shape) is unique in the scene, so "the red circle" is unambiguous."""
    keys = [(o.color, o.shape) for o in scene.objects]
    return [o for o in scene.objects if keys.count((o.color, o.shape)) == 1]


def unique_shape_objs(scene: Scene) -> List[Obj]:
    return _unique_shape_objs(scene)


def relation_pairs(scene: Scene) -> List[Tuple[str, Obj, Obj]]:
    """(relation, a, b) with a ``relation`` b, for objects sharing a row or a column of quadrants."""
    out = []
    for a in scene.objects:
        for b in scene.objects:
            if a is b:
                continue
            (ra, ca), (rb, cb) = _POS_RC[a.pos], _POS_RC[b.pos]
            if ra == rb and ca < cb:
                out.append(("to the left of", a, b))
                out.append(("to the right of", b, a))
            if ca == cb and ra < rb:
                out.append(("above", a, b))
                out.append(("below", b, a))
    return out


def absent_objects(scene: Scene) -> List[Tuple[str, str]]:
    present = {(o.color, o.shape) for o in scene.objects}
    return [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]


def near_miss_objects(scene: Scene) -> List[Tuple[str, str]]:
    """Absent (colour, shape) that share the shape or the colour of a present object."""
    present = {(o.color, o.shape) for o in scene.objects}
    out = set()
    for o in scene.objects:
        out |= {(c, o.shape) for c in COLOR_NAMES} | {(o.color, s) for s in SHAPES}
    return sorted(out - present)


def mc_prompt(question: str, options: Sequence[str]) -> str:
    """Upstream's MMBench prompt (model_vqa_mmbench with --single-pred-prompt), without <image>."""
    body = question + "".join(f"\n{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return body + "\n" + MC_PROMPT


def fix_articles(text: str) -> str:
    """``a orange`` -> ``an orange`` (the only vowel-initial word the templates can put after "a")."""
    return text.replace(" a orange", " an orange").replace("A orange", "An orange")


def _fill(t: str, rng: random.Random, **slots: str) -> str:
    return fix_articles(t.format(colour=rng.choice(["colour", "color"]), **slots))


def _mc(rng: random.Random, question: str, right: str, wrong: Sequence[str]) -> Tuple[str, str]:
    opts = [right] + rng.sample(list(wrong), 3)
    rng.shuffle(opts)
    return mc_prompt(question, opts), LETTERS[opts.index(right)]


def _short_or_sentence(rng: random.Random, q: str, short: str, sentence: str) -> Tuple[str, str]:
    """75% short answer under upstream's single-word prompt, else a sentence with no format prompt."""
    if rng.random() < 0.75:
        return f"{q}\n{SHORT_PROMPT}", short
    return q, sentence


def _desc_variants(o: Obj) -> List[str]:
    other_c = [c for c in COLOR_NAMES if c != o.color]
    other_s = [s for s in SHAPES if s != o.shape]
    other_z = [z for z in SIZES if z != o.size][0]
    return [f"{other_z} {o.color} {o.shape}"] + [f"{o.size} {c} {o.shape}" for c in other_c] + \
           [f"{o.size} {o.color} {s}" for s in other_s]


def _plain_caption(scene: Scene) -> str:
    return ", ".join(f"{o.desc} at {POSITIONS[o.pos]}" for o in scene.objects)  # compact: 4 of them fit a prompt


def _caption_variants(rng: random.Random, scene: Scene) -> List[str]:
    """Captions that differ from the scene's in exactly one attribute of one object."""
    out = set()
    objs = list(scene.objects)
    while len(out) < 3:
        i = rng.randrange(len(objs))
        o = objs[i]
        kind = rng.choice(["color", "shape", "size"])
        if kind == "color":
            o2 = Obj(rng.choice([c for c in COLOR_NAMES if c != o.color]), o.shape, o.size, o.pos)
        elif kind == "shape":
            o2 = Obj(o.color, rng.choice([s for s in SHAPES if s != o.shape]), o.size, o.pos)
        else:
            o2 = Obj(o.color, o.shape, "small" if o.size == "large" else "large", o.pos)
        out.add(_plain_caption(Scene(tuple(objs[:i] + [o2] + objs[i + 1:]), scene.bg, scene.jitter)))
    return sorted(out)


# kind -> sampling weight of a turn. Naming an object's colour dominates on purpose: mixed evenly over
# the kinds, the tiny LLM settles on answer priors and never starts reading the image tokens (colour
# stayed at chance after 2,000 steps), while with about half the turns asking for a colour it does
# within a few hundred steps; the other kinds then follow.
LARGE_MIX_WEIGHTS: Dict[str, float] = {
    "colour": 8.0, "colour_at": 4.0, "yn_colour": 1.5, "mc_colour": 1.5, "yn_exist": 2.0,
    "shape_at": 2.0, "size": 1.0, "where": 1.0, "count": 1.0, "count_colour": 0.7, "relation": 0.4,
    "yn_where": 0.6, "yn_size": 0.5, "yn_count": 0.5, "mc_shape": 0.5, "mc_where": 0.5, "mc_count": 0.5,
    "mc_desc": 0.7, "mc_relation": 0.4, "mc_caption": 0.4, "describe": 0.3,
}


def large_qa(rng: random.Random, scene: Scene, kind: str) -> Optional[Tuple[str, str]]:
    """One (human prompt, answer) of ``kind`` about ``scene`` with a training phrasing, or None."""
    T = lambda k: rng.choice(TRAIN_TEMPLATES[k])  # noqa: E731
    objs = list(scene.objects)
    named, uniq = named_objs(scene), unique_shape_objs(scene)
    yes = rng.random() < 0.5
    if kind == "colour" and uniq:
        o = rng.choice(uniq)
        return _short_or_sentence(rng, _fill(T(kind), rng, s=o.shape), o.color, f"It is {o.color}.")
    if kind == "colour_at":
        o = rng.choice(objs)
        return _short_or_sentence(rng, _fill(T(kind), rng, pos=POSITIONS[o.pos]), o.color, f"It is {o.color}.")
    if kind == "shape_at":
        o = rng.choice(objs)
        return _short_or_sentence(rng, _fill(T(kind), rng, pos=POSITIONS[o.pos]), o.shape, f"It is a {o.shape}.")
    if kind == "size" and named:
        o = rng.choice(named)
        return _short_or_sentence(rng, _fill(T(kind), rng, c=o.color, s=o.shape), o.size, f"It is {o.size}.")
    if kind == "where" and named:
        o = rng.choice(named)
        p = POSITIONS[o.pos]
        return _short_or_sentence(rng, _fill(T(kind), rng, c=o.color, s=o.shape), p, f"It is in the {p} corner.")
    if kind == "count":
        n = len(objs)
        return _short_or_sentence(rng, _fill(T(kind), rng), COUNT_WORDS[n],
                                  f"There {'is' if n == 1 else 'are'} {COUNT_WORDS[n]} shape{'s' if n > 1 else ''}.")
    if kind == "count_colour":
        c = rng.choice([o.color for o in objs] + [rng.choice(COLOR_NAMES)])
        n = sum(o.color == c for o in objs)
        return _short_or_sentence(rng, _fill(T(kind), rng, c=c), COUNT_WORDS[n],
                                  f"There {'is' if n == 1 else 'are'} {COUNT_WORDS[n]} {c} shape{'' if n == 1 else 's'}.")
    if kind in ("relation", "mc_relation"):
        pairs = [(r, a, b) for r, a, b in relation_pairs(scene) if b in named]
        if not pairs:
            return None
        rel, a, b = rng.choice(pairs)
        if kind == "relation":
            return _short_or_sentence(rng, _fill(T(kind), rng, rel=rel, c=b.color, s=b.shape),
                                      f"{a.color} {a.shape}", f"A {a.desc}.")
        wrong = [f"{c} {s}" for c, s in absent_objects(scene)] + [f"{o.color} {o.shape}" for o in objs if o is not a and o is not b]
        wrong = [w for w in wrong if w != f"{a.color} {a.shape}"]
        return _mc(rng, _fill(T(kind), rng, rel=rel, c=b.color, s=b.shape), f"{a.color} {a.shape}", wrong)
    if kind.startswith(("yn_", "mc_")):
        return _closed_qa(rng, scene, kind, yes)
    if kind == "describe":
        return _fill(T(kind), rng), caption_scene(rng, scene)
    return None


def _closed_qa(rng: random.Random, scene: Scene, kind: str, yes: bool) -> Optional[Tuple[str, str]]:
    """The yes/no (``yn_*``) and multiple-choice (``mc_*``) kinds of ``large_qa``."""
    T = lambda k: rng.choice(TRAIN_TEMPLATES[k])  # noqa: E731
    objs = list(scene.objects)
    named, uniq = named_objs(scene), unique_shape_objs(scene)
    if kind == "yn_exist":
        if yes and named:
            o = rng.choice(named)
            c, s = o.color, o.shape
        else:
            yes = False
            c, s = rng.choice(near_miss_objects(scene) if rng.random() < 0.5 else absent_objects(scene))
        return _short_or_sentence(rng, _fill(T(kind), rng, c=c, s=s), "yes" if yes else "no",
                                  f"Yes, there is a {c} {s}." if yes else f"No, there is no {c} {s}.")
    if kind == "yn_colour" and uniq:
        o = rng.choice(uniq)
        c = o.color if yes else rng.choice([x for x in COLOR_NAMES if x != o.color])
        return _short_or_sentence(rng, _fill(T(kind), rng, s=o.shape, c=c), "yes" if yes else "no",
                                  f"Yes, it is {c}." if yes else f"No, it is {o.color}.")
    if kind == "yn_where" and named:
        o = rng.choice(named)
        p = o.pos if yes else rng.choice([q for q in range(4) if q != o.pos])
        return _short_or_sentence(rng, _fill(T(kind), rng, c=o.color, s=o.shape, pos=POSITIONS[p]), "yes" if yes else "no",
                                  "Yes, it is." if yes else f"No, it is in the {POSITIONS[o.pos]} corner.")
    if kind == "yn_size" and named:
        o = rng.choice(named)
        z = o.size if yes else ("small" if o.size == "large" else "large")
        return _short_or_sentence(rng, _fill(T(kind), rng, c=o.color, s=o.shape, size=z), "yes" if yes else "no",
                                  f"Yes, it is {z}." if yes else f"No, it is {o.size}.")
    if kind == "yn_count":
        n = len(objs) if yes else rng.choice([k for k in (1, 2, 3, 4) if k != len(objs)])
        return _short_or_sentence(rng, _fill(T(kind), rng, n=COUNT_WORDS[n], pl="" if n == 1 else "s"),
                                  "yes" if yes else "no", "Yes." if yes else f"No, there are {COUNT_WORDS[len(objs)]}."
                                  if len(objs) > 1 else "No, there is one.")
    if kind == "mc_colour":
        o = rng.choice(uniq) if uniq else None
        if o is None:
            return None
        return _mc(rng, _fill(T(kind), rng, s=o.shape, pos=POSITIONS[o.pos]), o.color, [c for c in COLOR_NAMES if c != o.color])
    if kind == "mc_shape":
        o = rng.choice(objs)
        return _mc(rng, _fill(T(kind), rng, pos=POSITIONS[o.pos]), o.shape, [s for s in SHAPES if s != o.shape])
    if kind == "mc_where" and named:
        o = rng.choice(named)
        return _mc(rng, _fill(T(kind), rng, c=o.color, s=o.shape), POSITIONS[o.pos], [p for p in POSITIONS if p != POSITIONS[o.pos]])
    if kind == "mc_count":
        n = len(objs)
        return _mc(rng, _fill(T(kind), rng), COUNT_WORDS[n], [COUNT_WORDS[k] for k in (0, 1, 2, 3, 4) if k != n])
    if kind == "mc_desc":
        o = rng.choice(objs)
        return _mc(rng, _fill(T(kind), rng, pos=POSITIONS[o.pos]), o.desc, _desc_variants(o))
    if kind == "mc_caption":
        return _mc(rng, _fill(T(kind), rng), _plain_caption(scene), _caption_variants(rng, scene))
    return None


def large_text_qa(rng: random.Random, facts: Dict[str, List[Tuple[Dict[str, str], str, str]]]) -> Tuple[str, str]:
    kind = rng.choice(sorted(facts))
    slots, short, sentence = rng.choice(facts[kind])
    return _short_or_sentence(rng, _fill(rng.choice(TRAIN_TEMPLATES[kind]), rng, **slots), short, sentence)


def large_image_rel(idx: int) -> str:
    return f"coco/train2017/{LARGE_ID_BASE + idx:012d}.jpg"


LARGE_ID_BASE = 100_000_000  # image ids of the large mix, disjoint from the small mix's


def generate_large_mix(
    data_root: Path, seed: int, n_records: int, text_only_frac: float = 0.08, records_per_image: int = 2,
    json_name: str = "llava_v1_5_mix_large.json",
) -> Tuple[List[dict], set]:
    """Write the large stage-2 mix (+ its images under ``coco/train2017``); return records, scene signatures.

    Each image carries ``records_per_image`` records with independently drawn questions (as COCO
    images recur across the sources of upstream's mix), which halves the build time.
    """
    rng = random.Random(f"tiny-instruct-large-{seed}")
    kinds = sorted(LARGE_MIX_WEIGHTS)
    weights = [LARGE_MIX_WEIGHTS[k] for k in kinds]
    facts = world_facts()
    recs, sigs = [], set()
    sc, img_rel, uses, n_img = None, "", records_per_image, 0
    for j in range(n_records):
        if rng.random() < text_only_frac:
            conv = []
            for _ in range(rng.choice([2, 3])):
                q, a = large_text_qa(rng, facts)
                conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
            recs.append({"id": f"large_text_{j:06d}", "conversations": conv})
            continue
        if uses >= records_per_image:
            sc, img_rel, uses = sample_scene(rng), large_image_rel(n_img), 0
            n_img += 1
            sigs.add(sc.signature)
            _write(Path(data_root) / img_rel, jpeg_bytes(render_scene(sc)))
        uses += 1
        conv = []
        want = rng.choice([2, 2, 3])  # the tiny LLM has 256 positions; the v1 system prompt takes ~110
        while len(conv) < 2 * want:
            qa = large_qa(rng, sc, rng.choices(kinds, weights)[0])
            if qa is None:
                continue
            q = qa[0] if conv else f"<image>\n{qa[0]}"
            conv += [{"from": "human", "value": q}, {"from": "gpt", "value": qa[1]}]
        recs.append({"id": f"large_{j:06d}", "image": img_rel, "conversations": conv})
    out = Path(data_root) / json_name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(recs, ensure_ascii=False) + "\n", encoding="utf-8")  # C encoder: fast
    return recs, sigs
