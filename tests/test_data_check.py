"""llava_contrastive.data.check on a small corpus seeded with every kind of bad record."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from llava_contrastive.data import check as dc
from llava_contrastive.data.check import check_records

from corpus_helpers import noise_jpeg, record

REPO = Path(__file__).resolve().parents[1]
N_GOOD = 20
PROMPT = "Describe the image briefly.\n<image>"


def _rec(rid, image, caption="a red square on a grey background.", prompt=PROMPT):
    return record(rid, image, caption, prompt)


_noise_jpeg = noise_jpeg


def build_bad_corpus(root: Path, tiny_assets) -> tuple[list, Path, dict]:
    """(records, image_folder, {id: expected reason}); ids of the good records are not in the dict."""
    folder = root / "images"
    (folder / "00000").mkdir(parents=True)
    records, expected = [], {}
    src = json.loads(Path(tiny_assets.pretrain_json).read_text())[:N_GOOD]
    for r in src:
        shutil.copy(Path(tiny_assets.image_folder) / r["image"], folder / r["image"])
        records.append(r)
    base = Image.open(folder / src[0]["image"]).convert("RGB")
    # valid non-RGB images
    base.convert("L").save(folder / "gray.jpg")
    base.convert("P").save(folder / "palette.png")
    base.convert("RGBA").save(folder / "rgba.png")
    base.convert("LA").save(folder / "la.png")
    base.convert("CMYK").save(folder / "cmyk.jpg")
    Image.new("I;16", (32, 32)).save(folder / "i16.png")
    for name in ("gray.jpg", "palette.png", "rgba.png", "la.png", "cmyk.jpg", "i16.png"):
        records.append(_rec(f"mode-{name}", name))
    # bad files
    (folder / "random.jpg").write_bytes(random.Random(1).randbytes(3000))
    jpeg = _noise_jpeg()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (root / "escape.jpg").write_bytes((folder / src[1]["image"]).read_bytes())  # exists, but outside the folder
    good_image = src[2]["image"]

    def bad(rec, reason):
        records.append(rec)
        expected[rec["id"] if isinstance(rec, dict) else None] = reason

    bad(_rec("missing", "00000/does-not-exist.jpg"), "missing_image")
    bad(_rec("random-bytes", "random.jpg"), "unreadable_image")
    bad(_rec("truncated", "truncated.jpg"), "truncated_image")
    bad(_rec("zero-size", "empty.jpg"), "zero_size_image")
    bad(_rec("no-image-token", good_image, prompt="Describe the image briefly."), "missing_image_token")
    bad(_rec("no-image-key", None), "missing_image_token")
    bad(_rec("empty-caption", good_image, caption="   "), "empty_caption")
    bad({"id": "malformed-no-conversations", "image": good_image}, "malformed_record")
    bad({"id": "malformed-role", "image": good_image,
         "conversations": [{"from": "user", "value": "<image>"}, {"from": "gpt", "value": "x"}]}, "malformed_record")
    bad({"id": "malformed-value", "image": good_image,
         "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": 3}]}, "malformed_record")
    bad(_rec("malformed-caption-image", good_image, caption="two <image> here"), "malformed_record")
    bad(_rec(src[3]["id"], good_image), "duplicate_id")
    bad(_rec("escape", "../escape.jpg"), "path_escapes_folder")
    bad(_rec("absolute", str(root / "escape.jpg")), "path_escapes_folder")
    records.append("not a record")  # malformed, no id
    expected["<str>"] = "malformed_record"
    return records, folder, expected


def _by_id(report) -> dict:
    out = {}
    for b in report.bad:
        key = b.id if b.id is not None else "<str>"
        assert key not in out, f"{key} reported twice"
        out[key] = b.reason
    return out


@pytest.fixture(scope="module")
def corpus(tiny_assets, tmp_path_factory):
    return build_bad_corpus(tmp_path_factory.mktemp("corpus"), tiny_assets)


def test_every_reason_detected_for_exactly_its_record(corpus):
    records, folder, expected = corpus
    report = check_records(records, str(folder), mode="full", workers=4, cache_path=None, progress=False)
    assert _by_id(report) == expected
    assert set(dc.REASONS) - set(expected.values()) == {"caption_truncated_to_nothing"}  # tested below
    assert report.n_records == len(records)
    assert len(report.good_indices) == N_GOOD + 6
    assert sorted(report.good_indices + [b.index for b in report.bad]) == list(range(len(records)))
    assert report.counts_by_reason["malformed_record"] == 5
    assert sum(report.counts_by_reason.values()) == len(report.bad)
    # non-RGB modes are valid and counted
    assert report.mode_counts == {"RGB": N_GOOD, "L": 1, "P": 1, "RGBA": 1, "LA": 1, "CMYK": 1, "I;16": 1}
    # the first occurrence of a duplicated id is kept
    dup = next(b for b in report.bad if b.reason == "duplicate_id")
    first = next(i for i, r in enumerate(records) if isinstance(r, dict) and r.get("id") == dup.id)
    assert first in report.good_indices and dup.index != first


def test_quick_reads_headers_only_full_decodes(corpus):
    records, folder, expected = corpus
    quick = _by_id(check_records(records, str(folder), mode="quick", workers=2, cache_path=None, progress=False))
    full = _by_id(check_records(records, str(folder), mode="full", workers=2, cache_path=None, progress=False))
    assert full["truncated"] == "truncated_image"
    assert "truncated" not in quick  # the header is intact: only decoding finds it
    assert {k: v for k, v in full.items() if k != "truncated"} == quick


def test_mode_off_checks_records_without_touching_files(corpus):
    records, folder, expected = corpus
    report = check_records(records, str(folder), mode="off", cache_path=None, progress=False)
    file_reasons = {"missing_image", "unreadable_image", "truncated_image", "zero_size_image"}
    assert _by_id(report) == {k: v for k, v in expected.items() if v not in file_reasons}
    assert report.n_images == 0


def test_cache_makes_the_second_run_skip_the_files(corpus, tmp_path, monkeypatch):
    records, folder, expected = corpus
    cache = tmp_path / "cache.json"
    first = check_records(records, str(folder), mode="full", workers=2, cache_path=str(cache), progress=False)
    assert cache.exists() and first.cache_hits == 0
    calls = []
    original = dc._inspect_image
    monkeypatch.setattr(dc, "_inspect_image", lambda *a, **k: calls.append(a) or original(*a, **k))
    second = check_records(records, str(folder), mode="full", workers=2, cache_path=str(cache), progress=False)
    assert calls == []  # nothing opened again
    assert second.n_images == first.n_images
    assert second.cache_hits == first.n_images - 1  # all but the missing file (stat'ed again)
    assert second.bad == first.bad and second.good_indices == first.good_indices
    assert second.mode_counts == first.mode_counts
    # another mode does not use full-mode results
    quick = check_records(records, str(folder), mode="quick", workers=2, cache_path=str(cache), progress=False)
    assert quick.cache_hits == 0 and len(calls) > 0


def test_cache_notices_a_changed_file(corpus, tmp_path):
    records, folder, _ = corpus
    folder2 = tmp_path / "images"
    shutil.copytree(folder, folder2)
    (tmp_path / "escape.jpg").write_bytes(b"x")
    cache = tmp_path / "cache.json"
    first = check_records(records, str(folder2), mode="quick", workers=1, cache_path=str(cache), progress=False)
    victim = records[0]["image"]
    (folder2 / victim).write_bytes(b"garbage, not an image at all")
    second = check_records(records, str(folder2), mode="quick", workers=1, cache_path=str(cache), progress=False)
    assert second.cache_hits == first.n_images - 2  # minus the missing and the changed file
    assert _by_id(second)[records[0]["id"]] == "unreadable_image"
    os.unlink(folder2 / victim)
    third = check_records(records, str(folder2), mode="quick", workers=1, cache_path=str(cache), progress=False)
    assert _by_id(third)[records[0]["id"]] == "missing_image"


def test_summary_names_file_reason_total_and_fix(corpus):
    records, folder, expected = corpus
    report = check_records(records, str(folder), mode="full", workers=2, cache_path=None, progress=False)
    text = report.summary(max_items=50)
    assert f"{len(expected)} of {len(records)} records are bad" in text
    for line_id, reason in (("truncated", "truncated_image"), ("missing", "missing_image")):
        line = next(l for l in text.splitlines() if f"id={line_id!r}" in l)
        assert reason in line
    assert str(folder / "00000" / "does-not-exist.jpg") in text
    assert "--data_check_policy skip" in text and "skipped_records.json" in text
    short = report.summary(max_items=3)
    assert f"... and {len(expected) - 3} more" in short
    clean = check_records(records[:N_GOOD], str(folder), mode="quick", cache_path=None, progress=False)
    assert clean.ok and "0 of 20 records are bad" in clean.summary()


def test_report_json_round_trip(corpus):
    records, folder, _ = corpus
    report = check_records(records, str(folder), mode="quick", cache_path=None, progress=False)
    back = dc.CheckReport.from_json(json.loads(json.dumps(report.to_json())))
    assert back.bad == report.bad and back.good_indices == report.good_indices
    assert back.counts_by_reason == report.counts_by_reason


@pytest.fixture(scope="module")
def tokenizer(tiny_assets):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(tiny_assets.llm_dir), use_fast=False)


def test_caption_truncated_to_nothing_pretrain(corpus, tokenizer):
    """Plain template: the prompt is replaced by <image>, so what precedes the caption is BOS + the
    image's patch tokens for every record: either no caption survives or all do."""
    records, folder, _ = corpus
    good = records[:N_GOOD]
    ok = check_records(good, str(folder), mode="off", tokenizer=tokenizer, model_max_length=18, image_tokens=16,
                       progress=False)
    assert ok.ok  # 18 - (1 + 16) = 1 caption token survives
    cut = check_records(good, str(folder), mode="off", tokenizer=tokenizer, model_max_length=17, image_tokens=16,
                        progress=False)
    assert set(_by_id(cut).values()) == {"caption_truncated_to_nothing"} and len(cut.bad) == N_GOOD
    assert "model_max_length 17" in cut.bad[0].detail
    # without image_tokens only the placeholder counts (BOS + 1)
    assert check_records(good, str(folder), mode="off", model_max_length=3, progress=False).ok
    assert not check_records(good, str(folder), mode="off", model_max_length=2, progress=False).ok
    # partial truncation is a note, not an error
    part = check_records(good, str(folder), mode="off", tokenizer=tokenizer, model_max_length=20, image_tokens=16,
                         progress=False)
    assert part.ok and any("will be cut" in n for n in part.notes)


def test_caption_truncated_to_nothing_instruct_per_record(tokenizer):
    long_prompt = "<image>\n" + " ".join(["describe every detail of this picture"] * 20)
    records = [
        {"id": "short", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                          {"from": "gpt", "value": "A square."}], "image": "a.jpg"},
        {"id": "long", "conversations": [{"from": "human", "value": long_prompt},
                                         {"from": "gpt", "value": "A square."}], "image": "a.jpg"},
        {"id": "text-only", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
                                              {"from": "human", "value": "bye"}, {"from": "gpt", "value": "bye"}]},
        {"id": "bad-order", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
        {"id": "image-no-token", "conversations": [{"from": "human", "value": "what?"},
                                                   {"from": "gpt", "value": "x"}], "image": "a.jpg"},
    ]
    report = check_records(records, "/nonexistent", mode="off", tokenizer=tokenizer, model_max_length=64,
                           image_tokens=16, stage="instruct", progress=False)
    assert _by_id(report) == {"long": "caption_truncated_to_nothing", "bad-order": "malformed_record",
                              "image-no-token": "missing_image_token"}


def test_no_image_folder_and_settings_validation():
    rec = [_rec("a", "x.jpg")]
    report = check_records(rec, None, mode="quick", progress=False)
    assert _by_id(report) == {"a": "missing_image"}
    with pytest.raises(ValueError, match="--data_check"):
        check_records(rec, None, mode="fast", progress=False)
    with pytest.raises(ValueError, match="--data_check_policy"):
        dc.validate_settings("quick", "ignore")


def test_default_cache_path_depends_on_settings(tmp_path):
    data = tmp_path / "d.json"
    a = dc.default_cache_path(str(data), "/img", "quick")
    assert Path(a).parent == tmp_path and Path(a).name.startswith("d.json.check-")
    assert a != dc.default_cache_path(str(data), "/img", "full")
    assert a != dc.default_cache_path(str(data), "/other", "quick")
    assert a == dc.default_cache_path(str(data), "/img", "quick")


def test_arguments_parse_with_hf_argument_parser():
    import transformers

    (args,) = transformers.HfArgumentParser(dc.DataCheckArguments).parse_args_into_dataclasses(
        ["--data_check", "full", "--data_check_policy", "skip", "--data_check_workers", "3",
         "--data_check_cache", "/tmp/c.json"])
    assert (args.data_check, args.data_check_policy, args.data_check_workers, args.data_check_cache) == \
        ("full", "skip", 3, "/tmp/c.json")
    (default,) = transformers.HfArgumentParser(dc.DataCheckArguments).parse_args_into_dataclasses([])
    assert (default.data_check, default.data_check_policy, default.data_check_cache) == ("quick", "error", None)


def test_cli_prints_report_and_exits_1_on_bad_records(corpus, tmp_path):
    records, folder, expected = corpus
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               LLAVA_CONTRASTIVE_QUIET="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "llava_contrastive.data.check", "--data_path", str(data),
           "--image_folder", str(folder), "--mode", "full", "--no_progress", "--json", str(tmp_path / "r.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert f"{len(expected)} of {len(records)} records are bad" in proc.stdout
    assert "truncated_image" in proc.stdout and "records/s" in proc.stdout
    assert len(json.loads((tmp_path / "r.json").read_text())["bad"]) == len(expected)
    assert list(tmp_path.glob("data.json.check-*.json"))  # default cache next to the data
    good = tmp_path / "good.json"
    good.write_text(json.dumps(records[:N_GOOD]))
    proc = subprocess.run(cmd[:4] + [str(good)] + cmd[5:], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
