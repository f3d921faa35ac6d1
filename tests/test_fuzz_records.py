"""Property-based fuzzing of the data check (data/check.py: check_records) with hypothesis: every
mutated LLaVA record, stage 1 and stage 2, is either accepted (and then trainable by the plain
reference in fuzz_records.py) or reported with a known reason and a detail, never a traceback.
500 derandomized examples per stage (reproducible in CI), well within 60 s.

Regression cases below: crashes and misses the fuzzer found, each fixed in data/check.py."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings

from fuzz_records import GOOD_IMAGE, IMAGE, make_image_folder, records, trainable
from llava_contrastive.data.check import REASONS, CheckReport, check_records

FUZZ = settings(max_examples=500, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class CharTokenizer:
    """One token per character after a BOS (enough to exercise the length checks)."""
    bos_token_id = 1

    def __call__(self, text):
        class Ids:
            input_ids = [1] + [ord(c) % 1000 + 2 for c in text]
        return Ids()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("fuzz"))


def assert_each_accepted_or_reported(recs: list, stage: str, folder: str, **kwargs) -> CheckReport:
    report = check_records(recs, folder, stage=stage, workers=1, cache_path=None, progress=False, **kwargs)
    good, bad = set(report.good_indices), [b.index for b in report.bad]
    assert len(bad) == len(set(bad)) and not good & set(bad) and good | set(bad) == set(range(len(recs)))
    for b in report.bad:
        assert b.reason in REASONS and isinstance(b.detail, str) and b.detail, b
    for i in good:
        assert trainable(recs[i], stage, folder), (stage, recs[i])
    ids = [str(recs[i]["id"]) for i in sorted(good) if recs[i].get("id") is not None]
    assert len(ids) == len(set(ids)), ids  # a duplicate id is reported, the first one kept
    json.dumps(report.to_json(with_good_indices=True))  # the report files can be written
    assert isinstance(report.summary(), str)
    return report


@pytest.mark.parametrize("stage", ["pretrain", "instruct"])
def test_fuzzed_records_are_accepted_or_reported_never_raise(folder, stage):
    @FUZZ
    @given(recs=records(stage))
    def check(recs):
        assert_each_accepted_or_reported(recs, stage, folder)

    check()


@pytest.mark.parametrize("stage", ["pretrain", "instruct"])
def test_fuzzed_records_with_a_tokenizer_and_a_length_limit(folder, stage):
    """The length checks too (model_max_length, image tokens, tokenizer), and the file-free mode."""
    @settings(FUZZ, max_examples=200)
    @given(recs=records(stage))
    def check(recs):
        assert_each_accepted_or_reported(recs, stage, folder, tokenizer=CharTokenizer(), model_max_length=64,
                                         image_tokens=16)
        check_records(recs, folder, stage=stage, mode="off", workers=1, cache_path=None, progress=False)

    check()


# ---- regressions found by the fuzzer ---------------------------------------------------------------
def _pretrain(image, caption="a cat."):
    return {"id": "r", "image": image, "conversations": [{"from": "human", "value": IMAGE},
                                                         {"from": "gpt", "value": caption}]}


@pytest.mark.parametrize("image", ["img/\x00good.jpg", "img/\ud800.jpg"])
def test_image_path_with_nul_or_lone_surrogate_is_reported(folder, image):
    """os.stat raised ValueError (embedded null byte) / UnicodeEncodeError out of the check."""
    report = assert_each_accepted_or_reported([_pretrain(image), _pretrain(GOOD_IMAGE)], "pretrain", folder)
    assert [(b.index, b.reason) for b in report.bad] == [(0, "malformed_record")]
    assert report.good_indices == [1]


def test_instruct_image_token_in_two_human_turns_is_reported(folder):
    """Upstream puts one image token in every human turn holding <image>: two turns, one image, would
    splice the next sample's image features (or fail past the batch)."""
    rec = {"id": 1, "image": GOOD_IMAGE, "conversations": [
        {"from": "human", "value": f"{IMAGE}\nWhat is it?"}, {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": f"And here? {IMAGE}"}, {"from": "gpt", "value": "Also a cat."}]}
    report = assert_each_accepted_or_reported([rec], "instruct", folder)
    assert [(b.reason, "2 human turns" in b.detail) for b in report.bad] == [("malformed_record", True)]
    rec["conversations"][2]["value"] = "And here?"  # one turn, even with several tokens in it: fine
    rec["conversations"][0]["value"] = f"{IMAGE} {IMAGE}\nWhat is it?"
    assert check_records([rec], folder, stage="instruct", workers=1, cache_path=None, progress=False).ok


def test_instruct_answers_after_a_dropped_leading_gpt_turn_must_not_all_be_blank(folder):
    """Upstream drops a leading assistant turn: it is not an answer the record trains on."""
    rec = {"id": "a", "conversations": [{"from": "gpt", "value": "Hello."}, {"from": "human", "value": "What is it?"},
                                        {"from": "gpt", "value": ""}]}
    report = assert_each_accepted_or_reported([rec], "instruct", folder)
    assert [b.reason for b in report.bad] == ["empty_caption"]
    rec["conversations"][2]["value"] = "A cat."
    assert check_records([rec], folder, stage="instruct", workers=1, cache_path=None, progress=False).ok


@pytest.mark.parametrize("stage", ["pretrain", "instruct"])
def test_text_with_a_lone_surrogate_is_reported(folder, stage):
    """JSON can carry "\\ud800"; str.encode (the length check, the tokenizer) raised UnicodeEncodeError."""
    rec = _pretrain(GOOD_IMAGE, caption="a cat \ud800")
    report = assert_each_accepted_or_reported([rec], stage, folder, tokenizer=CharTokenizer(), model_max_length=8)
    assert [(b.reason, "position 6" in b.detail) for b in report.bad] == [("malformed_record", True)]
