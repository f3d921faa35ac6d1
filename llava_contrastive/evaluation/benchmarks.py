"""Synthetic downstream benchmarks on tiny-asset scenes, in their real counterparts' file formats.

``python -m llava_contrastive.evaluation.benchmarks --out DIR [--seed S] [--questions N]`` (the tiny
build calls :func:`build_benchmarks` into ``<root>/data/eval``). Pure python + PIL, deterministic
for a seed. Images are scenes drawn from their own seed stream, and every scene whose signature
(the set of (colour, shape, size, quadrant)) was used by stage 1 or stage 2 is skipped, so no
benchmark image repeats a training scene (this leaves 2-3 object scenes: the one-object scenes are
all used by stage 1). Question phrasings are held out: ``BENCH_TEMPLATES`` here, the stage-2
``TRAIN_TEMPLATES`` in ``dev/tiny_data.py``; a test checks that no benchmark question matches a
training template.

Splits: the **test** split uses the upstream layout at the top of each benchmark folder; the
**validation** split (its own images, disjoint from test) repeats the same layout under
``<benchmark>/validation/``. ``benchmarks.json`` at the top lists every file per split.
``questions`` counts model queries (answers-file lines) per split.

Layout (``eval/`` = ``playground/tiny/data/eval`` for the tiny assets; ``[validation/]`` = optional):

  pope/[validation/]llava_pope_test.jsonl        question_id(int), image, text, category  (model_vqa_loader)
  pope/[validation/]coco/coco_pope_{random,popular,adversarial}.json
                                                  JSON lines: question_id, image, text, label (yes/no),
                                                  in question order (upstream eval_pope.py reads them)
  pope/[validation/]val2014/COCO_val2014_<12 digits>.jpg
  mme/[validation/]llava_mme.jsonl               question_id(int), image, text, category  (model_vqa_loader)
  mme/[validation/]mme_annotations.jsonl         question_id, category, image, question, answer (yes/no),
                                                  pair_id (the two questions of one image: opposite answers)
  mme/[validation/]images/<category>/<6 digits>.jpg   categories: existence count position color size
  mmbench/[validation/]mmbench_tiny.tsv          MMBench TSV: index question hint A B C D answer category
                                                  l2-category split image(base64 JPEG). Each question is stored
                                                  4 times, options rotated circularly; row index =
                                                  base + k * MMBENCH_ROTATION_OFFSET (k = rotation 0..3), as
                                                  MMBench's circular copies (g_index = index % offset).
  mmbench/[validation/]llava_mmbench.jsonl       the same rows for model_vqa_loader: question_id (= TSV index),
                                                  image (images/<base>.jpg), text (model_vqa_mmbench's prompt with
                                                  --single-pred-prompt), category
  gqa/[validation/]llava_gqa_testdev_balanced.jsonl   question_id(str), image, text (+ single-word prompt)
  gqa/[validation/]data/testdev_balanced_questions.json  GQA format {qid: {imageId, question, answer,
                                                  fullAnswer, types: {detailed: category}}}
  gqa/[validation/]data/images/<id>.jpg
  textqa/[validation/]llava_textqa.jsonl         question_id(int), text, category  (no image)
  textqa/[validation/]textqa_annotations.jsonl   question_id, category, question, answer
                                                  (distinct held-out questions on the stage-2 world facts; the
                                                  two splits hold disjoint question strings; fewer than
                                                  ``questions`` when the distinct ones run out)
"""
from __future__ import annotations

import argparse
import base64
import csv
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

from llava_contrastive.dev import tiny_data as D

BENCHMARKS: Tuple[str, ...] = ("pope", "mme", "mmbench", "gqa", "textqa")
SPLITS: Tuple[str, ...] = ("validation", "test")
POPE_CATEGORIES: Tuple[str, ...] = ("random", "popular", "adversarial")
MME_CATEGORIES: Tuple[str, ...] = ("existence", "count", "position", "color", "size")
MMBENCH_CATEGORIES: Tuple[str, ...] = ("attribute", "position", "count", "relation", "caption")
GQA_CATEGORIES: Tuple[str, ...] = ("color", "shape", "count", "position", "size", "exist")
MMBENCH_ROTATION_OFFSET = 1_000_000
MME_SUFFIX = " Please answer yes or no."
SHORT_PROMPT = D.SHORT_PROMPT  # upstream's "Answer the question using a single word or phrase."
MC_PROMPT = D.MC_PROMPT

# Held-out phrasings (never used by the stage-2 data). Same placeholders as D.TRAIN_TEMPLATES.
BENCH_TEMPLATES: Dict[str, List[str]] = {
    "pope": ["Is there a {c} {s} in the image?"],
    "mme_existence": ["Is there a {c} {s} in this picture?"],
    "mme_count": ["Does this picture contain exactly {n} shape{pl}?"],
    "mme_position": ["Is the {c} {s} in the {pos} part of the picture?"],
    "mme_color": ["Is the {s} in this picture {c}?"],
    "mme_size": ["Is the {c} {s} in this picture {size}?"],
    "mmb_color": ["What is the color of the shape located in the {pos} quarter of the picture?"],
    "mmb_shape": ["What kind of shape appears in the {pos} quarter of the picture?"],
    "mmb_desc": ["Which option best describes the item in the {pos} quarter of the picture?"],
    "mmb_position": ["In which part of the picture is the {c} {s} located?"],
    "mmb_count": ["How many shapes does the picture contain?"],
    "mmb_relation": ["Which shape is placed directly {rel} the {c} {s} in the picture?"],
    "mmb_caption": ["Which caption fits the picture best?"],
    # GQA: each phrasing keeps the question word of a training kind and adds what training never says
    # ("in this picture", "drawn"): a 166k-parameter LLM does not map unseen paraphrases
    # ("What is the number of shapes ...?") to a question type, so those measured language, not grounding.
    # GQA: a held-out opening before a question whose end a training kind shares (the tiny LLM reads the
    # question type from its last words: unseen paraphrases such as "What is the number of shapes in
    # the picture?" were answered "yes", so they measured paraphrasing, not grounding).
    "gqa_color": ["In this picture, what color is the {s}?", "Looking at this picture, what colour is the {s}?"],
    "gqa_color_at": ["In this picture, what color is the object in the {pos} corner?",
                     "Looking at this picture, what colour is the object in the {pos} corner?"],
    "gqa_shape": ["In this picture, what shape is in the {pos} corner?", "Looking at this picture, what shape is in the {pos} corner?"],
    "gqa_count_color": ["In this picture, how many {c} shapes are there?", "Looking at this picture, how many {c} shapes are there?"],
    "gqa_count": ["In this picture, how many shapes are there?", "Looking at this picture, how many shapes are there?"],
    "gqa_where": ["In this picture, in which corner is the {c} {s}?", "Looking at this picture, in which corner is the {c} {s}?"],
    "gqa_size": ["In this picture, is the {c} {s} small or large?", "Looking at this picture, is the {c} {s} small or large?"],
    "gqa_exist": ["In this picture, can you see a {s}?", "Looking at this picture, can you see a {s}?"],
}
TEXTQA_KINDS: Tuple[str, ...] = ("sides", "corners", "mix", "filled", "bigger", "thing_colour", "next_number", "opposite")
# Text QA: held-out openings before the stage-2 world-fact questions (same reason as GQA's).
TEXTQA_OPENINGS: Tuple[str, ...] = ("Here is a question. ", "Quick question: ", "Without a picture: ", "From general knowledge: ")
BENCH_TEMPLATES.update({
    k: [o + t[0].lower() + t[1:].replace("{colour}", "color") for o in TEXTQA_OPENINGS for t in D.TRAIN_TEMPLATES[k]]
    for k in TEXTQA_KINDS})


def _t(rng: random.Random, kind: str, **slots: str) -> str:
    return D.fix_articles(rng.choice(BENCH_TEMPLATES[kind]).format(**slots))


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


# ----------------------------------------------------------------------------- scenes and files


class SceneSource:
    """Fresh scenes from the benchmark seed stream, never repeating any ``excluded`` signature."""

    def __init__(self, seed: int, excluded: Iterable[tuple], stream: str, log: Optional[list] = None) -> None:
        self.rng = random.Random(f"tiny-bench-{stream}-{seed}")
        self.seen: Set[tuple] = set(excluded)
        self.log = log  # signatures drawn, when a list is given

    def next(self) -> D.Scene:
        for _ in range(100000):
            sc = D.sample_scene(self.rng)
            if sc.signature not in self.seen:
                self.seen.add(sc.signature)
                if self.log is not None:
                    self.log.append(sc.signature)
                return sc
        raise RuntimeError("no unseen scene left: lower --questions or the number of training scenes")


def _jsonl(path: Path, rows: Iterable[dict]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: Path) -> List[dict]:
    with open(path, "r", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _save_image(path: Path, scene: D.Scene) -> bytes:
    data = D.jpeg_bytes(D.render_scene(scene))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def split_dir(bench_root: Path, benchmark: str, split: str) -> Path:
    """Folder of one split: the benchmark folder (test) or its ``validation/`` sub-folder."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose from {', '.join(BENCHMARKS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    d = Path(bench_root) / benchmark
    return d if split == "test" else d / "validation"


@dataclass(frozen=True)
class BenchFiles:
    question_file: Path  # model_vqa_loader question jsonl
    image_folder: Optional[Path]  # --image-folder for it (None: text-only)
    annotation: Path  # ground truth (file or, for POPE, the coco/ folder)
    table: Optional[Path] = None  # MMBench TSV


def bench_files(bench_root: Path, benchmark: str, split: str = "test") -> BenchFiles:
    d = split_dir(bench_root, benchmark, split)
    if benchmark == "pope":
        return BenchFiles(d / "llava_pope_test.jsonl", d / "val2014", d / "coco")
    if benchmark == "mme":
        return BenchFiles(d / "llava_mme.jsonl", d / "images", d / "mme_annotations.jsonl")
    if benchmark == "mmbench":
        return BenchFiles(d / "llava_mmbench.jsonl", d / "images", d / "mmbench_tiny.tsv", d / "mmbench_tiny.tsv")
    if benchmark == "gqa":
        return BenchFiles(d / "llava_gqa_testdev_balanced.jsonl", d / "data" / "images",
                          d / "data" / "testdev_balanced_questions.json")
    return BenchFiles(d / "llava_textqa.jsonl", None, d / "textqa_annotations.jsonl")


# ----------------------------------------------------------------------------- POPE


def pope_negatives(rng: random.Random, scene: D.Scene, k: int, category: str,
                   popularity: Sequence[Tuple[str, str]]) -> List[Tuple[str, str]]:
    """``k`` absent (colour, shape) objects by POPE's sampling: random, popular (most frequent in the
    split's images first) or adversarial (same shape other colour / same colour other shape)."""
    absent = D.absent_objects(scene)
    if category == "random":
        return rng.sample(absent, k)
    if category == "popular":
        absent_set = set(absent)
        return [o for o in popularity if o in absent_set][:k]
    if category == "adversarial":
        return rng.sample(D.near_miss_objects(scene), k)
    raise ValueError(category)


def build_pope(d: Path, src: SceneSource, n_questions: int, id_base: int, img_base: int) -> Dict[str, int]:
    rng = random.Random(src.rng.random())
    scenes: List[D.Scene] = []
    total = 0
    while True:
        sc = src.next()
        per = 6 * len({(o.color, o.shape) for o in sc.objects})  # 3 categories x (positives + negatives)
        if scenes and total + per > n_questions:
            break
        scenes.append(sc)
        total += per
    counts: Dict[Tuple[str, str], int] = {}
    for sc in scenes:
        for key in {(o.color, o.shape) for o in sc.objects}:
            counts[key] = counts.get(key, 0) + 1
    order = {(c, s): i for i, (c, s) in enumerate((c, s) for c in D.COLOR_NAMES for s in D.SHAPES)}
    popularity = sorted(order, key=lambda o: (-counts.get(o, 0), order[o]))
    images = []
    for i, sc in enumerate(scenes):
        name = f"COCO_val2014_{img_base + i:012d}.jpg"
        _save_image(d / "val2014" / name, sc)
        images.append(name)
    questions, labels = [], {c: [] for c in POPE_CATEGORIES}
    qid = id_base
    for cat in POPE_CATEGORIES:
        for sc, name in zip(scenes, images):
            pos = sorted({(o.color, o.shape) for o in sc.objects})
            items = [(o, "yes") for o in pos] + [(o, "no") for o in pope_negatives(rng, sc, len(pos), cat, popularity)]
            rng.shuffle(items)
            for (c, s), label in items:
                text = _t(rng, "pope", c=c, s=s) + "\n" + SHORT_PROMPT
                questions.append({"question_id": qid, "image": name, "text": text, "category": cat})
                labels[cat].append({"question_id": qid, "image": name, "text": text, "label": label})
                qid += 1
    _jsonl(d / "llava_pope_test.jsonl", questions)
    for cat in POPE_CATEGORIES:
        _jsonl(d / "coco" / f"coco_pope_{cat}.json", labels[cat])
    return {"questions": len(questions), "images": len(images)}


# ----------------------------------------------------------------------------- MME


def mme_pair(rng: random.Random, scene: D.Scene, category: str) -> Optional[Tuple[str, str]]:
    """(question whose answer is yes, question whose answer is no) for one image, or None."""
    named, uniq = D.named_objs(scene), D.unique_shape_objs(scene)
    if category == "existence" and named:
        o = rng.choice(named)
        c, s = rng.choice(D.near_miss_objects(scene) if rng.random() < 0.5 else D.absent_objects(scene))
        return _t(rng, "mme_existence", c=o.color, s=o.shape), _t(rng, "mme_existence", c=c, s=s)
    if category == "count":
        n = len(scene.objects)
        m = rng.choice([k for k in (1, 2, 3, 4) if k != n])
        f = lambda k: _t(rng, "mme_count", n=D.COUNT_WORDS[k], pl="" if k == 1 else "s")  # noqa: E731
        return f(n), f(m)
    if category == "position" and named:
        o = rng.choice(named)
        p = rng.choice([q for q in range(4) if q != o.pos])
        f = lambda q: _t(rng, "mme_position", c=o.color, s=o.shape, pos=D.POSITIONS[q])  # noqa: E731
        return f(o.pos), f(p)
    if category == "color" and uniq:
        o = rng.choice(uniq)
        c = rng.choice([x for x in D.COLOR_NAMES if x != o.color])
        return _t(rng, "mme_color", s=o.shape, c=o.color), _t(rng, "mme_color", s=o.shape, c=c)
    if category == "size" and named:
        o = rng.choice(named)
        other = "small" if o.size == "large" else "large"
        return (_t(rng, "mme_size", c=o.color, s=o.shape, size=o.size),
                _t(rng, "mme_size", c=o.color, s=o.shape, size=other))
    return None


def build_mme(d: Path, src: SceneSource, n_questions: int, id_base: int, img_base: int) -> Dict[str, int]:
    rng = random.Random(src.rng.random())
    per_cat = max(1, n_questions // (2 * len(MME_CATEGORIES)))
    questions, ann = [], []
    qid, img = id_base, img_base
    for cat in MME_CATEGORIES:
        for _ in range(per_cat):
            while True:
                sc = src.next()
                pair = mme_pair(rng, sc, cat)
                if pair is not None:
                    break
            rel = f"{cat}/{img:06d}.jpg"
            _save_image(d / "images" / rel, sc)
            items = [(pair[0], "yes"), (pair[1], "no")]
            rng.shuffle(items)
            for q, a in items:
                q = q + MME_SUFFIX
                questions.append({"question_id": qid, "image": rel, "text": q + "\n" + SHORT_PROMPT, "category": cat})
                ann.append({"question_id": qid, "category": cat, "image": rel, "question": q, "answer": a, "pair_id": img})
                qid += 1
            img += 1
    _jsonl(d / "llava_mme.jsonl", questions)
    _jsonl(d / "mme_annotations.jsonl", ann)
    return {"questions": len(questions), "images": img - img_base}


# ----------------------------------------------------------------------------- MMBench


def mmbench_item(rng: random.Random, scene: D.Scene, category: str) -> Optional[Tuple[str, str, List[str]]]:
    """(question, right option, 3 wrong options) or None when the scene does not fit the category."""
    objs = list(scene.objects)
    named = D.named_objs(scene)
    if category == "attribute":
        o = rng.choice(objs)
        kind = rng.choice(["color", "color", "shape", "desc"])  # colour-weighted
        if kind == "color":
            return (_t(rng, "mmb_color", pos=D.POSITIONS[o.pos]), o.color,
                    rng.sample([c for c in D.COLOR_NAMES if c != o.color], 3))
        if kind == "shape":
            return (_t(rng, "mmb_shape", pos=D.POSITIONS[o.pos]), o.shape,
                    rng.sample([s for s in D.SHAPES if s != o.shape], 3))
        return _t(rng, "mmb_desc", pos=D.POSITIONS[o.pos]), o.desc, rng.sample(D._desc_variants(o), 3)
    if category == "position" and named:
        o = rng.choice(named)
        return (_t(rng, "mmb_position", c=o.color, s=o.shape), D.POSITIONS[o.pos],
                [p for p in D.POSITIONS if p != D.POSITIONS[o.pos]])
    if category == "count":
        n = len(objs)
        return _t(rng, "mmb_count"), D.COUNT_WORDS[n], [D.COUNT_WORDS[k] for k in (1, 2, 3, 4) if k != n]
    if category == "relation":
        pairs = [(r, a, b) for r, a, b in D.relation_pairs(scene) if b in named]
        if not pairs:
            return None
        rel, a, b = rng.choice(pairs)
        right = f"{a.color} {a.shape}"
        others = [f"{o.color} {o.shape}" for o in objs if o is not a and o is not b]
        wrong = [w for w in others if w != right][:1]
        wrong += rng.sample([f"{c} {s}" for c, s in D.absent_objects(scene)], 3 - len(wrong))
        return _t(rng, "mmb_relation", rel=rel, c=b.color, s=b.shape), right, wrong
    if category == "caption":
        return _t(rng, "mmb_caption"), D._plain_caption(scene), D._caption_variants(rng, scene)
    return None


def rotations(options: Sequence[str], answer: int) -> List[Tuple[List[str], int]]:
    """All circular rotations of the options (k = 0..n-1: shift left by k) with the answer's new index."""
    n = len(options)
    return [(list(options[k:]) + list(options[:k]), (answer - k) % n) for k in range(n)]


MMBENCH_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "split", "image"]


def build_mmbench(d: Path, src: SceneSource, n_questions: int, id_base: int, split: str) -> Dict[str, int]:
    rng = random.Random(src.rng.random())
    n_base = max(1, n_questions // 4)
    rows, loader = [], []
    for i in range(n_base):
        cat = MMBENCH_CATEGORIES[i % len(MMBENCH_CATEGORIES)]
        while True:
            sc = src.next()
            item = mmbench_item(rng, sc, cat)
            if item is not None:
                break
        q, right, wrong = item
        opts = [right] + list(wrong)
        rng.shuffle(opts)
        base = id_base + i
        img_rel = f"images/{base}.jpg"
        b64 = base64.b64encode(_save_image(d / img_rel, sc)).decode("ascii")
        for k, (rot, ans) in enumerate(rotations(opts, opts.index(right))):
            idx = base + k * MMBENCH_ROTATION_OFFSET
            rows.append([idx, q, "", *rot, D.LETTERS[ans], cat, "tiny_perception", split, b64])
            loader.append({"question_id": idx, "image": img_rel.split("/", 1)[1], "text": D.mc_prompt(q, rot), "category": cat})
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "mmbench_tiny.tsv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(MMBENCH_COLUMNS)
        w.writerows(rows)
    _jsonl(d / "llava_mmbench.jsonl", loader)
    return {"questions": len(rows), "base_questions": n_base, "images": n_base}


def read_mmbench_tsv(path: Path) -> List[Dict[str, str]]:
    csv.field_size_limit(1 << 30)
    with open(path, "r", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


# ----------------------------------------------------------------------------- GQA


def gqa_item(rng: random.Random, scene: D.Scene, category: str) -> Optional[Tuple[str, str, str]]:
    """(question, short answer, full answer) or None."""
    objs = list(scene.objects)
    named, uniq = D.named_objs(scene), D.unique_shape_objs(scene)
    if category == "color":
        if uniq and rng.random() < 0.5:
            o = rng.choice(uniq)
            return _t(rng, "gqa_color", s=o.shape), o.color, f"The {o.shape} is {o.color}."
        o = rng.choice(objs)
        return _t(rng, "gqa_color_at", pos=D.POSITIONS[o.pos]), o.color, f"It is {o.color}."
    if category == "shape":
        o = rng.choice(objs)
        return _t(rng, "gqa_shape", pos=D.POSITIONS[o.pos]), o.shape, f"It is a {o.shape}."
    if category == "count":
        if rng.random() < 0.5:
            c = rng.choice([o.color for o in objs] + [rng.choice(D.COLOR_NAMES)])
            n = sum(o.color == c for o in objs)
            return _t(rng, "gqa_count_color", c=c), str(n), f"There are {n}."
        n = len(objs)
        return _t(rng, "gqa_count"), str(n), f"There are {n}."
    if category == "position" and named:
        o = rng.choice(named)
        p = D.POSITIONS[o.pos]
        return _t(rng, "gqa_where", c=o.color, s=o.shape), p, f"It is in the {p} corner."
    if category == "size" and named:
        o = rng.choice(named)
        return _t(rng, "gqa_size", c=o.color, s=o.shape), o.size, f"It is {o.size}."
    if category == "exist":
        present = sorted({o.shape for o in objs})
        if rng.random() < 0.5:
            return _t(rng, "gqa_exist", s=rng.choice(present)), "yes", "Yes, there is."
        absent = [s for s in D.SHAPES if s not in present]
        return _t(rng, "gqa_exist", s=rng.choice(absent)), "no", "No, there is not."
    return None


GQA_WEIGHTS = {"color": 3.0, "shape": 1.5, "count": 1.5, "position": 1.5, "size": 1.0, "exist": 1.5}


def build_gqa(d: Path, src: SceneSource, n_questions: int, id_base: int, img_base: int) -> Dict[str, int]:
    rng = random.Random(src.rng.random())
    cats = list(GQA_WEIGHTS)
    questions, ann = [], {}
    img = img_base
    while len(questions) < n_questions:
        sc = src.next()
        name = f"{img}"
        used = set()
        for _ in range(min(3, n_questions - len(questions))):
            cat = rng.choices(cats, [GQA_WEIGHTS[c] for c in cats])[0]
            item = gqa_item(rng, sc, cat)
            if item is None or item[0] in used:
                continue
            used.add(item[0])
            q, a, full = item
            qid = f"{id_base + len(questions)}"
            questions.append({"question_id": qid, "image": f"{name}.jpg", "text": q + "\n" + SHORT_PROMPT, "category": cat})
            ann[qid] = {"imageId": name, "question": q, "answer": a, "fullAnswer": full, "types": {"detailed": cat}}
        if used:
            _save_image(d / "data" / "images" / f"{name}.jpg", sc)
            img += 1
    _jsonl(d / "llava_gqa_testdev_balanced.jsonl", questions)
    (d / "data").mkdir(parents=True, exist_ok=True)
    (d / "data" / "testdev_balanced_questions.json").write_text(json.dumps(ann, indent=1) + "\n", encoding="utf-8")
    return {"questions": len(questions), "images": img - img_base}


# ----------------------------------------------------------------------------- text-only QA


def textqa_pool() -> List[Tuple[str, str, str]]:
    """Every distinct held-out (category, question, answer) on the stage-2 world facts, sorted."""
    facts = D.world_facts()
    out = set()
    for kind in TEXTQA_KINDS:
        for slots, short, _ in facts[kind]:
            for t in BENCH_TEMPLATES[kind]:
                out.add((kind, _cap(t.format(**slots)), short))
    return sorted(out)


def build_textqa(dirs: Dict[str, Path], seed: int, n_questions: int) -> Dict[str, Dict[str, int]]:
    pool = textqa_pool()
    random.Random(f"tiny-bench-textqa-{seed}").shuffle(pool)
    half = len(pool) // 2
    parts = {"validation": pool[:half][:n_questions], "test": pool[half:][:n_questions]}
    out = {}
    for split, items in parts.items():
        d = dirs[split]
        qs, ann = [], []
        for i, (kind, q, a) in enumerate(items):
            qs.append({"question_id": i, "text": q + "\n" + SHORT_PROMPT, "category": kind})
            ann.append({"question_id": i, "category": kind, "question": q, "answer": a})
        _jsonl(d / "llava_textqa.jsonl", qs)
        _jsonl(d / "textqa_annotations.jsonl", ann)
        out[split] = {"questions": len(qs), "images": 0}
    return out


# ----------------------------------------------------------------------------- everything


def question_core(text: str) -> str:
    """A question without the format prompts and options (for held-out template checks)."""
    core = text.split("\n")[0]
    return core[: -len(MME_SUFFIX)] if core.endswith(MME_SUFFIX) else core


def build_benchmarks(out_dir: Path, seed: int = 0, questions: int = 1000,
                     excluded_signatures: Iterable[tuple] = (),
                     scene_log: Optional[list] = None) -> Dict[str, Dict[str, Dict[str, int]]]:
    """Write all five benchmarks (both splits) under ``out_dir``; return counts per benchmark/split.

    ``excluded_signatures``: scene signatures used by stage 1/2 (``GeneratedData.signatures`` and the
    large mix's), never drawn here. ``scene_log``: a list that receives every drawn scene's signature.
    """
    out_dir = Path(out_dir)
    src = SceneSource(seed, excluded_signatures, "scenes", scene_log)
    stats: Dict[str, Dict[str, Dict[str, int]]] = {b: {} for b in BENCHMARKS}
    for split, id_base in (("test", 0), ("validation", 500_000)):
        stats["pope"][split] = build_pope(split_dir(out_dir, "pope", split), src, questions, id_base, id_base)
        stats["mme"][split] = build_mme(split_dir(out_dir, "mme", split), src, questions, id_base, id_base)
        stats["mmbench"][split] = build_mmbench(split_dir(out_dir, "mmbench", split), src, questions, id_base, split)
        stats["gqa"][split] = build_gqa(split_dir(out_dir, "gqa", split), src, questions, id_base, id_base)
    stats["textqa"] = build_textqa({s: split_dir(out_dir, "textqa", s) for s in SPLITS}, seed, questions)
    index = {}
    for b in BENCHMARKS:
        index[b] = {}
        for s in SPLITS:
            f = bench_files(out_dir, b, s)
            rel = lambda p: None if p is None else str(p.relative_to(out_dir))  # noqa: E731
            index[b][s] = {"question_file": rel(f.question_file), "image_folder": rel(f.image_folder),
                           "annotation": rel(f.annotation), "table": rel(f.table), **stats[b][s]}
    (out_dir / "benchmarks.json").write_text(
        json.dumps({"seed": seed, "questions_per_split": questions, "benchmarks": index}, indent=1, sort_keys=True) + "\n",
        encoding="utf-8")
    return stats


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llava_contrastive.evaluation.benchmarks",
                                 description="Write the synthetic benchmark suite (see module docstring).")
    ap.add_argument("--out", required=True, help="output folder (the tiny build uses <root>/data/eval)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--questions", type=int, default=1000, help="model queries per benchmark and split (default 1000)")
    # standalone builds avoid no training scenes; build_tiny_assets passes the stage-1/2 signatures
    args = ap.parse_args(argv)
    if args.questions < 10:
        sys.stderr.write("--questions must be >= 10\n")
        return 2
    t = time.time()
    stats = build_benchmarks(Path(args.out), args.seed, args.questions)
    print(json.dumps(stats, indent=1))
    print(f"built in {time.time() - t:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
