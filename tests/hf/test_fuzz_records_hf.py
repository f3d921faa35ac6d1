"""The record fuzzer of tests/test_fuzz_records.py under stack M, through the native host's own entry
to the check: ``data/guard.py: run_data_check`` (what ``hosts/hf/train.py: checked_records`` calls,
stage 1), with its report file and both policies. Every fuzzed record is accepted (and trainable by
the plain reference) or reported with a known reason; under ``error`` a bad record becomes the
DataCheckError that stops the run before step 1, never another exception. 500 derandomized
examples per stage."""
from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings

from fuzz_records import GOOD_IMAGE, IMAGE, make_image_folder, records, trainable
from llava_contrastive.data.check import REASONS, DataCheckError
from llava_contrastive.data.guard import REPORT_NAME, run_data_check

FUZZ = settings(max_examples=500, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def where(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_hf")
    out = root / "out"
    out.mkdir()
    return make_image_folder(root), str(out), str(root / "data.json")


def check_setting(policy: str, out: str) -> dict:
    return {"data_check": "quick", "data_check_policy": policy, "data_check_workers": 1,
            "data_check_cache": os.path.join(out, "check_cache.json")}


@pytest.mark.parametrize("stage", ["pretrain", "instruct"])
def test_fuzzed_records_through_the_native_hosts_check(where, stage):
    folder, out, data_path = where

    anchor = {"id": "fuzz-anchor-0001", "image": GOOD_IMAGE,  # a good record, so that skip keeps one
              "conversations": [{"from": "human", "value": IMAGE}, {"from": "gpt", "value": "a cat."}]}

    @FUZZ
    @given(recs=records(stage))
    def check(recs):
        recs = recs + [anchor]
        report = run_data_check(recs, data_path=data_path, image_folder=folder, output_dir=out, is_main=True,
                                settings=check_setting("skip", out), stage=stage, progress=False)
        good = set(report.good_indices)
        assert len(recs) - 1 in good
        assert good | {b.index for b in report.bad} == set(range(len(recs)))
        assert all(b.reason in REASONS and b.detail for b in report.bad)
        assert all(trainable(recs[i], stage, folder) for i in good)
        with open(os.path.join(out, REPORT_NAME)) as f:
            assert json.load(f)["n_bad"] == len(report.bad)
        if report.bad:
            with pytest.raises(DataCheckError) as err:
                run_data_check(recs, data_path=data_path, image_folder=folder, output_dir=out, is_main=True,
                               settings=check_setting("error", out), stage=stage, progress=False)
            assert report.bad[0].reason in str(err.value)

    check()
