"""Hypothesis strategies for fuzzing LLaVA records (shared by tests/test_fuzz_records.py, stack U, and
tests/hf/test_fuzz_records_hf.py, stack M), and the plain reference of what a trainable record is.

A fuzzed record starts as a valid stage-1 (pretrain: [human "<image>...", gpt caption]) or stage-2
(instruct: alternating human/gpt rounds, optional image) record and gets 0-3 mutations: wrong types,
missing keys, nested lists, unicode (incl. NUL and lone surrogates, which JSON can carry), huge
strings, 0 / 1 / many ``<image>``, absolute and ``..`` paths, non-string ids, turns with wrong roles
or counts. Everything stays a value ``json.load`` can return, as the data files are JSON.
"""
from __future__ import annotations

import os
from typing import Any, Optional

from hypothesis import strategies as st

from corpus_helpers import noise_jpeg

IMAGE = "<image>"
# the fixture folder: one valid image, one empty file, one non-image, a sub-folder
GOOD_IMAGE, EMPTY_IMAGE, NOT_AN_IMAGE, SUBDIR = "img/good.jpg", "img/empty.jpg", "img/notes.jpg", "img"
IMAGES = (GOOD_IMAGE, GOOD_IMAGE, GOOD_IMAGE, EMPTY_IMAGE, NOT_AN_IMAGE)

ODD_STRINGS = ("", " ", "\n", "\t \n", IMAGE, IMAGE * 3, f"{IMAGE}\n{IMAGE} two", "<image", "<IMAGE>", "\x00",
               "a\x00b", "\ud800", "caption \udfff end", "ünïcødé 图像 🖼️ \u202e", "null", "0", "../x.jpg",
               "/etc/passwd", "img/../../outside.jpg", "img/../img/good.jpg", "./img/good.jpg", "img/", ".", "..",
               "~/x.jpg", "C:\\x.jpg", "img\\good.jpg", "img/missing.jpg")
ESCAPES = ("../outside.jpg", "img/../../outside.jpg", "/etc/passwd", "../images/img/good.jpg", "img/../../../x.jpg",
           "//outside.jpg")  # (the 4th leaves the folder by name and comes back in: fine)
HUGE = st.sampled_from((200_000, 1 << 16)).map(lambda n: "word " * (n // 5))
TEXT = st.one_of(st.text(max_size=40), st.sampled_from(ODD_STRINGS), HUGE,
                 st.text(alphabet=st.characters(exclude_categories=()), max_size=8))  # incl. surrogates, controls
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2 ** 70, max_value=2 ** 70),
                    st.floats(allow_nan=True, allow_infinity=True), TEXT)
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                    max_leaves=6)
IDS = st.one_of(st.sampled_from(["a", "b", "1", 1, 1.0, True, None, "", [1], {"k": 1}, "ü"]), SCALARS)
CAPTIONS = st.one_of(st.sampled_from(["a red square.", "two cats on a sofa", "  x  "]), TEXT)


def _turn(role: str, value: Any) -> dict:
    return {"from": role, "value": value}


@st.composite
def valid_pretrain(draw) -> dict:
    prompt = draw(st.sampled_from([IMAGE, f"{IMAGE}\nDescribe.", f"Describe {IMAGE}"]))
    return {"id": draw(IDS), "image": draw(st.sampled_from(IMAGES)),
            "conversations": [_turn("human", prompt), _turn("gpt", draw(CAPTIONS))]}


@st.composite
def valid_instruct(draw) -> dict:
    rounds = draw(st.integers(1, 3))
    conv = []
    for _ in range(rounds):
        conv += [_turn("human", draw(st.sampled_from(["What is it?", "Why?", "Count them."]))),
                 _turn("gpt", draw(CAPTIONS))]
    rec: dict = {"id": draw(IDS), "conversations": conv}
    if draw(st.booleans()):
        rec["image"] = draw(st.sampled_from(IMAGES))
        conv[0]["value"] = draw(st.sampled_from([f"{IMAGE}\n", "", f"\n{IMAGE}"])) + conv[0]["value"]
    if draw(st.booleans()):
        conv.insert(0, _turn("gpt", "Hello."))  # upstream drops a leading assistant turn
    return rec


def _any_turn(draw, conv: list) -> Optional[int]:
    return draw(st.integers(0, len(conv) - 1)) if conv else None


@st.composite
def mutated(draw, base) -> Any:
    """A valid record of ``base`` with 0-3 mutations."""
    rec = draw(base)
    for _ in range(draw(st.integers(0, 3))):
        if not isinstance(rec, dict):
            break
        kind = draw(st.sampled_from(["drop_key", "key_type", "whole", "image_path", "image_tokens", "turns",
                                     "turn_field", "huge", "extra_key"]))
        conv = rec.get("conversations") if isinstance(rec.get("conversations"), list) else []
        if kind == "drop_key":
            rec.pop(draw(st.sampled_from(["id", "image", "conversations"])), None)
        elif kind == "key_type":
            rec[draw(st.sampled_from(["id", "image", "conversations"]))] = draw(JSON)
        elif kind == "whole":
            rec = draw(st.one_of(JSON, st.lists(st.just(rec), min_size=1, max_size=2)))  # incl. a nested record
        elif kind == "image_path":
            rec["image"] = draw(st.one_of(st.sampled_from(ODD_STRINGS + (SUBDIR, EMPTY_IMAGE, NOT_AN_IMAGE)),
                                          st.sampled_from(ESCAPES),
                                          st.just(os.path.abspath(os.sep + GOOD_IMAGE)), TEXT,
                                          st.lists(st.sampled_from(IMAGES), max_size=2)))
        elif kind == "image_tokens" and conv:
            j = _any_turn(draw, conv)
            if isinstance(conv[j], dict):
                n = draw(st.sampled_from([0, 1, 2, 5]))
                text = conv[j].get("value") if isinstance(conv[j].get("value"), str) else ""
                conv[j]["value"] = (IMAGE + "\n") * n + text.replace(IMAGE, "")
        elif kind == "turns":
            op = draw(st.sampled_from(["drop", "dup", "swap", "empty", "role", "not_dict", "nested", "reverse"]))
            j = _any_turn(draw, conv)
            if op == "empty" or j is None:
                rec["conversations"] = []
            elif op == "drop":
                del conv[j]
            elif op == "dup":
                conv.insert(j, conv[j])
            elif op == "swap" and isinstance(conv[j], dict):
                conv[j]["from"] = {"human": "gpt", "gpt": "human"}.get(conv[j].get("from"), "human")
            elif op == "role" and isinstance(conv[j], dict):
                conv[j]["from"] = draw(st.one_of(st.sampled_from(["user", "assistant", "system", "Human", "GPT", ""]),
                                                 JSON))
            elif op == "not_dict":
                conv[j] = draw(JSON)
            elif op == "nested":
                rec["conversations"] = [conv]
            else:
                conv.reverse()
        elif kind == "turn_field" and conv:
            j = _any_turn(draw, conv)
            if isinstance(conv[j], dict):
                key = draw(st.sampled_from(["value", "from"]))
                if draw(st.booleans()):
                    conv[j].pop(key, None)
                else:
                    conv[j][key] = draw(JSON)
        elif kind == "huge" and conv and isinstance(conv[-1], dict):
            conv[-1]["value"] = draw(HUGE)
        elif kind == "extra_key":
            rec[draw(st.text(max_size=6))] = draw(JSON)
    return rec


def records(stage: str):
    """1-3 fuzzed records of one stage (several: duplicate ids across records)."""
    base = valid_pretrain() if stage == "pretrain" else valid_instruct()
    return st.lists(mutated(base), min_size=1, max_size=3)


def make_image_folder(root) -> str:
    """The folder the fuzzed records point into (see GOOD_IMAGE ...)."""
    folder = os.path.join(str(root), "images")
    os.makedirs(os.path.join(folder, SUBDIR), exist_ok=True)
    with open(os.path.join(folder, GOOD_IMAGE), "wb") as f:
        f.write(noise_jpeg(size=16))
    open(os.path.join(folder, EMPTY_IMAGE), "wb").close()
    with open(os.path.join(folder, NOT_AN_IMAGE), "w") as f:
        f.write("not an image\n")
    with open(os.path.join(str(root), "outside.jpg"), "wb") as f:
        f.write(noise_jpeg(size=16))
    return folder


# ---- the reference: what upstream can train on ----------------------------------------------------
def _str_turns(conv: Any) -> bool:
    return isinstance(conv, list) and bool(conv) and all(
        isinstance(t, dict) and t.get("from") in ("human", "gpt") and isinstance(t.get("value"), str) for t in conv)


def trainable(rec: Any, stage: str, folder: str) -> bool:
    """A plain restatement of what upstream's dataset and template need from one record, for the
    records the check accepts: turns, roles, one image token per image, a caption, an existing,
    readable image inside the folder (the valid fixture image is the only such file)."""
    if not isinstance(rec, dict) or not _str_turns(rec.get("conversations")):
        return False
    conv = rec["conversations"]
    roles = [t["from"] for t in conv]
    if any(t["from"] == "gpt" and IMAGE in t["value"] for t in conv):
        return False
    if "image" in rec:
        image = rec["image"]
        if not isinstance(image, str):
            return False
        path = os.path.normpath(os.path.join(folder, image))
        if not path.startswith(folder + os.sep) or path != os.path.join(folder, os.path.normpath(GOOD_IMAGE)):
            return False
    if stage == "pretrain":
        return roles == ["human", "gpt"] and "image" in rec and IMAGE in conv[0]["value"] \
            and bool(conv[1]["value"].strip())
    if roles[0] == "gpt":
        roles, conv = roles[1:], conv[1:]
    if roles != ["human", "gpt"] * (len(roles) // 2) + ["human"] * (len(roles) % 2):
        return False
    with_token = [t for t in conv if t["from"] == "human" and IMAGE in t["value"]]
    if "image" in rec and len(with_token) != 1:  # upstream splices one image per human turn with <image>
        return False
    return any(t["value"].strip() for t in conv if t["from"] == "gpt")
