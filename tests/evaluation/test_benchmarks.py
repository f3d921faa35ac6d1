"""Synthetic benchmark suite + large stage-2 mix: formats, splits, held-out templates, determinism."""
from __future__ import annotations

import base64
import collections
import hashlib
import json
import re
from pathlib import Path

import pytest

from llava_contrastive.dev import tiny_data as D
from llava_contrastive.dev.tiny import TinyAssets, _build_eval_data
from llava_contrastive.evaluation import benchmarks as B

Q = 120  # questions per benchmark and split (smoke size)
N_LARGE = 1500


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Small stage-1/2 data + large mix + benchmarks, through the tiny build's own data step."""
    root = tmp_path_factory.mktemp("tiny")
    paths = TinyAssets.at(root)
    gen = D.generate_data(paths.data_root, 0, 1500, 100, 200, 0.1)
    stats = _build_eval_data(paths, 0, {"n_instruct_large": N_LARGE, "bench_questions": Q}, gen.signatures, lambda m: None)
    return paths, gen, stats


def _digest(p: Path) -> str:
    return hashlib.sha1(p.read_bytes()).hexdigest()


def _images(d: Path):
    return sorted(p for p in d.rglob("*.jpg"))


# ----------------------------------------------------------------------------- POPE


def test_pope_format(built):
    paths, _, _ = built
    for split in B.SPLITS:
        f = B.bench_files(paths.eval_root, "pope", split)
        qs = B.read_jsonl(f.question_file)
        assert qs and all(set(q) == {"question_id", "image", "text", "category"} for q in qs)
        assert all(q["text"].endswith("\nAnswer the question using a single word or phrase.") for q in qs)
        assert all(re.fullmatch(r"Is there an? \w+ \w+ in the image\?", q["text"].split("\n")[0]) for q in qs)
        assert len({q["question_id"] for q in qs}) == len(qs)
        assert sorted(p.name for p in f.annotation.iterdir()) == [f"coco_pope_{c}.json" for c in sorted(B.POPE_CATEGORIES)]
        for cat in B.POPE_CATEGORIES:
            lab = B.read_jsonl(f.annotation / f"coco_pope_{cat}.json")
            mine = [q for q in qs if q["category"] == cat]
            # label file = the category's questions, same order (upstream zips them by position)
            assert [(r["question_id"], r["image"], r["text"]) for r in lab] == [(q["question_id"], q["image"], q["text"]) for q in mine]
            assert set(lab[0]) == {"question_id", "image", "text", "label"}
            c = collections.Counter(r["label"] for r in lab)
            assert c["yes"] == c["no"] == len(lab) // 2  # exactly 50% yes
        assert all((f.image_folder / q["image"]).is_file() for q in qs)
        assert all(re.fullmatch(r"COCO_val2014_\d{12}\.jpg", q["image"]) for q in qs)


def _scene_objs(text):
    m = re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", text.split("\n")[0])
    return m.group(1), m.group(2)


def test_pope_negative_sampling(built):
    """yes = object present; popular negatives = most frequent absent objects; adversarial share an attribute."""
    paths, _, _ = built
    f = B.bench_files(paths.eval_root, "pope", "test")
    lab = {c: B.read_jsonl(f.annotation / f"coco_pope_{c}.json") for c in B.POPE_CATEGORIES}
    # present objects per image = the yes questions (identical across categories)
    present = collections.defaultdict(set)
    for r in lab["random"]:
        if r["label"] == "yes":
            present[r["image"]].add(_scene_objs(r["text"]))
    for c in B.POPE_CATEGORIES:
        yes = collections.defaultdict(set)
        for r in lab[c]:
            if r["label"] == "yes":
                yes[r["image"]].add(_scene_objs(r["text"]))
        assert yes == present
    counts = collections.Counter(o for objs in present.values() for o in objs)
    order = [(c, s) for c in D.COLOR_NAMES for s in D.SHAPES]
    popularity = sorted(order, key=lambda o: (-counts[o], order.index(o)))
    for img, objs in present.items():
        neg = {c: [_scene_objs(r["text"]) for r in lab[c] if r["image"] == img and r["label"] == "no"] for c in lab}
        for c in lab:
            assert len(neg[c]) == len(objs) and not set(neg[c]) & objs
        assert set(neg["popular"]) == set([o for o in popularity if o not in objs][: len(objs)])
        for col, shp in neg["adversarial"]:
            assert any(col == pc or shp == ps for pc, ps in objs)


# ----------------------------------------------------------------------------- MME / MMBench / GQA / textqa


def test_mme_pairs(built):
    paths, _, _ = built
    f = B.bench_files(paths.eval_root, "mme", "test")
    qs, ann = B.read_jsonl(f.question_file), B.read_jsonl(f.annotation)
    assert [q["question_id"] for q in qs] == [a["question_id"] for a in ann]
    assert {a["category"] for a in ann} == set(B.MME_CATEGORIES)
    pairs = collections.defaultdict(list)
    for q, a in zip(qs, ann):
        assert q["text"] == a["question"] + "\n" + B.SHORT_PROMPT and a["question"].endswith(" Please answer yes or no.")
        assert q["image"] == a["image"] and (f.image_folder / a["image"]).is_file()
        pairs[a["pair_id"]].append(a)
    for p in pairs.values():
        assert len(p) == 2 and sorted(x["answer"] for x in p) == ["no", "yes"]
        assert p[0]["image"] == p[1]["image"] and p[0]["category"] == p[1]["category"]
    assert len(qs) == Q


def test_mmbench_rotations(built):
    paths, _, _ = built
    f = B.bench_files(paths.eval_root, "mmbench", "test")
    rows = B.read_mmbench_tsv(f.table)
    assert list(rows[0]) == B.MMBENCH_COLUMNS
    loader = {q["question_id"]: q for q in B.read_jsonl(f.question_file)}
    groups = collections.defaultdict(list)
    for r in rows:
        groups[int(r["index"]) % B.MMBENCH_ROTATION_OFFSET].append(r)
    assert {r["category"] for r in rows} == set(B.MMBENCH_CATEGORIES)
    for g, rs in groups.items():
        assert sorted(int(r["index"]) // B.MMBENCH_ROTATION_OFFSET for r in rs) == [0, 1, 2, 3]
        rs.sort(key=lambda r: int(r["index"]))
        opts0 = [rs[0][k] for k in "ABCD"]
        assert len(set(opts0)) == 4
        right = rs[0][rs[0]["answer"]]
        for k, r in enumerate(rs):
            assert [r[x] for x in "ABCD"] == opts0[k:] + opts0[:k]
            assert r[r["answer"]] == right  # same right option under every rotation
            img = base64.b64decode(r["image"])
            assert img == (f.image_folder / f"{g}.jpg").read_bytes()
            # the loader file holds model_vqa_mmbench's prompt (hint empty, --single-pred-prompt)
            want = r["question"] + "".join(f"\n{x}. {r[x]}" for x in "ABCD") + \
                "\nAnswer with the option's letter from the given choices directly."
            assert loader[int(r["index"])]["text"] == want
    letters = collections.Counter(r["answer"] for r in rows)
    assert set(letters) == set("ABCD") and len(rows) == Q


def test_gqa_and_textqa(built):
    paths, _, _ = built
    f = B.bench_files(paths.eval_root, "gqa", "test")
    qs = B.read_jsonl(f.question_file)
    ann = json.loads(f.annotation.read_text())
    assert [q["question_id"] for q in qs] == list(ann) and len(qs) == Q
    for q in qs:
        a = ann[q["question_id"]]
        assert q["text"] == a["question"] + "\n" + B.SHORT_PROMPT
        assert re.fullmatch(r"[a-z]+|\d|(top|bottom) (left|right)", a["answer"]) and (f.image_folder / q["image"]).is_file()
        assert a["imageId"] + ".jpg" == q["image"]
    texts = {}
    for split in B.SPLITS:
        f = B.bench_files(paths.eval_root, "textqa", split)
        qs, ann = B.read_jsonl(f.question_file), B.read_jsonl(f.annotation)
        assert f.image_folder is None and all("image" not in q for q in qs)
        assert [a["question"] + "\n" + B.SHORT_PROMPT for a in ann] == [q["text"] for q in qs]
        texts[split] = {a["question"] for a in ann}
        assert len(texts[split]) == len(ann) > 40
        facts = {(k, s) for k, v in D.world_facts().items() for _, s, _ in v}
        assert all((a["category"], a["answer"]) in facts for a in ann)
    assert not texts["validation"] & texts["test"]


# ----------------------------------------------------------------------------- splits, unseen scenes, templates


def test_splits_and_images_disjoint_from_training(built):
    paths, gen, _ = built
    bench = {}
    for b in ("pope", "mme", "mmbench", "gqa"):
        for split in B.SPLITS:
            d = B.bench_files(paths.eval_root, b, split).image_folder
            ims = _images(d) if split == "validation" else [p for p in _images(d) if "validation" not in p.parts]
            assert ims, (b, split)
            for p in ims:
                bench.setdefault(_digest(p), []).append((b, split, p.name))
    assert all(len(v) == 1 for v in bench.values()), [v for v in bench.values() if len(v) > 1][:3]
    train = {_digest(p) for p in _images(paths.data_root / "LLaVA-Pretrain") + _images(paths.data_root / "coco")}
    assert len(train) > 2000
    assert not set(bench) & train
    # scene level: a build logs the scenes it draws: none is a stage-1/2 scene, none repeats
    log = []
    B.build_benchmarks(paths.root / "again", 0, 60, gen.signatures, scene_log=log)
    assert len(log) > 100 and len(set(log)) == len(log) and not set(log) & gen.signatures
    assert len(gen.signatures) > 1500


def _alt(words):
    return "(?:" + "|".join(re.escape(w) for w in words) + ")"


# every value a training template's placeholder can take
SLOTS = {
    "colour": _alt(["colour", "color"]), "c": _alt(D.COLOR_NAMES), "a": _alt(D.COLOR_NAMES), "b": _alt(D.COLOR_NAMES),
    "s": _alt(D.SHAPES), "pos": _alt(D.POSITIONS), "size": _alt(D.SIZES), "n": _alt(D.COUNT_WORDS.values()),
    "pl": "s?", "rel": _alt(["to the left of", "to the right of", "above", "below"]),
    "thing": _alt(["grass", "the sky", "snow", "coal", "a banana", "a tomato", "a carrot", "a plum"]),
}


def _train_regexes():
    """One regex per training template: the exact set of questions that template can produce."""
    out = []
    for ts in D.TRAIN_TEMPLATES.values():
        for t in ts:
            pieces = re.split(r"(\{\w+\})", t)
            pat = "".join(SLOTS[p[1:-1]] if p.startswith("{") else re.escape(p) for p in pieces)
            out.append(re.compile(pat.replace(" a ", " an? "), re.IGNORECASE))
    return out


def test_held_out_templates(built):
    paths, _, _ = built
    regs = _train_regexes()
    human = set()
    for p in (paths.instruct_json, paths.instruct_large_json):
        for r in json.loads(p.read_text()):
            for c in r["conversations"]:
                if c["from"] == "human":
                    human.add(c["value"].replace("<image>\n", "").split("\n")[0])
    cores = set()
    for b in B.BENCHMARKS:
        for split in B.SPLITS:
            for q in B.read_jsonl(B.bench_files(paths.eval_root, b, split).question_file):
                cores.add(B.question_core(q["text"]))
    assert len(cores) > 300
    hits = [c for c in cores if any(r.fullmatch(c) for r in regs)]
    assert not hits, hits[:5]
    assert not cores & human
    # the templates are separate lists, and the sentinel check catches a training phrasing
    assert any(r.fullmatch("What colour is the circle?") for r in regs)


def test_determinism(tmp_path):
    a = B.build_benchmarks(tmp_path / "a", seed=5, questions=40)
    b = B.build_benchmarks(tmp_path / "b", seed=5, questions=40)
    assert a == b
    fa = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()}
    fb = {p.relative_to(tmp_path / "b"): p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()}
    assert fa.keys() == fb.keys() and all(fa[k] == fb[k] for k in fa)
    B.build_benchmarks(tmp_path / "c", seed=6, questions=40)
    assert (tmp_path / "c/pope/llava_pope_test.jsonl").read_bytes() != fa[Path("pope/llava_pope_test.jsonl")]
    r1, _ = D.generate_large_mix(tmp_path / "m1", 1, 50)
    r2, _ = D.generate_large_mix(tmp_path / "m2", 1, 50)
    assert r1 == r2


def test_cli_questions_knob(tmp_path, capsys):
    assert B.main(["--out", str(tmp_path / "e"), "--questions", "20"]) == 0
    idx = json.loads((tmp_path / "e/benchmarks.json").read_text())
    assert idx["questions_per_split"] == 20
    assert idx["benchmarks"]["mme"]["test"]["questions"] == 20
    assert idx["benchmarks"]["pope"]["validation"]["question_file"] == "pope/validation/llava_pope_test.jsonl"
    assert B.main(["--out", str(tmp_path / "f"), "--questions", "3"]) == 2


# ----------------------------------------------------------------------------- large stage-2 mix


def test_large_mix(built):
    paths, _, stats = built
    recs = json.loads(paths.instruct_large_json.read_text())
    assert len(recs) == N_LARGE == stats["n_instruct_large"]
    assert json.loads(paths.instruct_json.read_text())[0]["id"] != recs[0]["id"]  # the small mix is untouched
    text_only = [r for r in recs if "image" not in r]
    assert 0.05 * N_LARGE < len(text_only) < 0.11 * N_LARGE
    yn, mc, short, colour_turns, n_turns = [], [], [], 0, 0
    for r in recs:
        conv = r["conversations"]
        assert [c["from"] for c in conv] == ["human", "gpt"] * (len(conv) // 2) and len(conv) >= 4
        if "image" in r:
            assert conv[0]["value"].startswith("<image>\n") and (paths.instruct_image_folder / r["image"]).is_file()
            assert sum(c["value"].count("<image>") for c in conv) == 1
        for h, g in zip(conv[::2], conv[1::2]):
            n_turns += 1
            q, a = h["value"], g["value"]
            if q.endswith(D.MC_PROMPT):
                mc.append(a)
                assert a in "ABCD" and len(a) == 1
            elif q.endswith(D.SHORT_PROMPT):
                short.append(a)
                assert len(a.split()) <= 2, a
                if a in ("yes", "no"):
                    yn.append(a)
            colour_turns += any(c in a.split() or c == a for c in D.COLOR_NAMES) or ("colo" in q and "image" in r)
    c = collections.Counter(yn)
    assert abs(c["yes"] - c["no"]) < 0.1 * len(yn)
    assert set(mc) == set("ABCD") and max(collections.Counter(mc).values()) < 0.3 * len(mc)
    assert len(short) > 0.4 * n_turns and len(mc) > 0.1 * n_turns
    assert colour_turns > 0.45 * n_turns  # colour leads the mix (dev/tiny_data.py LARGE_MIX_WEIGHTS says why)
