"""Bad training data with the upstream host.

* make_checked_data_module / GuardedDataset around upstream's real LazySupervisedDataset (fast).
* End to end (slow): the real training CLI on a corpus seeded with every kind of bad stage-1
  record: ``--data_check_policy error`` stops before step 1 and lists them; ``skip`` trains on
  exactly the good records.
"""
from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from corpus_helpers import noise_jpeg, record, write_corpus

from tests.host import runs

N_GOOD = 24
BATCH = 8


_rec = record
_noise_jpeg = noise_jpeg


def bad_stage1_corpus(root: Path, assets) -> tuple[Path, Path, dict]:
    """(data json, image folder, {bad id: reason}): N_GOOD good records (some non-RGB) and one record
    of every stage-1 failure that is a property of a record. (caption_truncated_to_nothing is not
    seeded: with the plain template the caption is preceded by BOS + the image for every record,
    so it fails for all records or none; tests/test_data_check.py covers it.)"""
    folder = root / "images"
    (folder / "00000").mkdir(parents=True)
    src = json.loads(Path(assets.pretrain_json).read_text())[:N_GOOD - 3]
    records = []
    for r in src:
        shutil.copy(Path(assets.image_folder) / r["image"], folder / r["image"])
        records.append(r)
    base = Image.open(folder / src[0]["image"]).convert("RGB")
    base.convert("L").save(folder / "gray.jpg")
    base.convert("P").save(folder / "palette.png")
    base.convert("CMYK").save(folder / "cmyk.jpg")
    records += [_rec("gray", "gray.jpg"), _rec("palette", "palette.png"), _rec("cmyk", "cmyk.jpg")]
    (folder / "random.jpg").write_bytes(random.Random(1).randbytes(3000))
    jpeg = _noise_jpeg()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (root / "escape.jpg").write_bytes((folder / src[1]["image"]).read_bytes())
    img = src[2]["image"]
    bad = {
        "missing": (_rec("missing", "00000/does-not-exist.jpg"), "missing_image"),
        "random-bytes": (_rec("random-bytes", "random.jpg"), "unreadable_image"),
        "truncated": (_rec("truncated", "truncated.jpg"), "truncated_image"),
        "zero-size": (_rec("zero-size", "empty.jpg"), "zero_size_image"),
        "no-image-token": (_rec("no-image-token", img, prompt="Describe the image."), "missing_image_token"),
        "no-image-key": (_rec("no-image-key", None), "missing_image_token"),
        "empty-caption": (_rec("empty-caption", img, caption=" "), "empty_caption"),
        "malformed": ({"id": "malformed", "image": img, "conversations": [{"from": "human", "value": "<image>"}]},
                      "malformed_record"),
        "malformed-role": ({"id": "malformed-role", "image": img, "conversations": [
            {"from": "user", "value": "<image>"}, {"from": "gpt", "value": "x"}]}, "malformed_record"),
        src[3]["id"]: (_rec(src[3]["id"], img), "duplicate_id"),
        "escape": (_rec("escape", "../escape.jpg"), "path_escapes_folder"),
    }
    data = root / "data.json"
    return data, folder, write_corpus(data, records, bad, every=2)


# ----------------------------------------------------------------------------- in process (fast)


@pytest.fixture(scope="module")
def corpus(tiny_assets, tmp_path_factory):
    return bad_stage1_corpus(tmp_path_factory.mktemp("bad_corpus"), tiny_assets)


@pytest.fixture(scope="module")
def host(tiny_assets):
    import transformers

    from llava_contrastive.hosts.llava import compat

    upstream = compat.upstream_train_module()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_assets.llm_dir), model_max_length=96,
                                                           padding_side="right", use_fast=False)
    tokenizer.pad_token = tokenizer.unk_token
    processor = transformers.CLIPImageProcessor.from_pretrained(str(tiny_assets.vision_dir))
    return SimpleNamespace(upstream=upstream, tokenizer=tokenizer, processor=processor)


@pytest.fixture
def plain(host, monkeypatch):
    conv = host.upstream.conversation_lib
    monkeypatch.setattr(conv, "default_conversation", conv.conv_templates["plain"])


def _data_args(host, data, folder, **flags):
    return SimpleNamespace(data_path=str(data), image_folder=str(folder), image_processor=host.processor,
                           is_multimodal=True, image_aspect_ratio="square", mm_use_im_start_end=False,
                           lazy_preprocess=True, **flags)


def _make(host, data, folder, out, **flags):
    from llava_contrastive.hosts.llava.data import make_checked_data_module

    flags.setdefault("data_check_cache", str(Path(out) / "cache.json"))
    args = _data_args(host, data, folder, **flags)
    return make_checked_data_module(host.upstream.make_supervised_data_module, host.tokenizer, args,
                                    str(out), True, image_tokens=16)


def test_policy_error_raises_before_training_with_the_list(host, plain, corpus, tmp_path):
    from llava_contrastive.hosts.llava.data import DataCheckError

    data, folder, bad = corpus
    with pytest.raises(DataCheckError) as err:
        _make(host, data, folder, tmp_path, data_check="full", data_check_policy="error")
    assert isinstance(err.value, ValueError)
    text = str(err.value)
    for rid, reason in bad.items():
        assert any(f"id={rid!r}" in line and reason in line for line in text.splitlines()), (rid, reason)
    assert "--data_check_policy skip" in text
    report = json.loads((tmp_path / "data_check_report.json").read_text())
    assert report["n_bad"] == len(bad) and report["policy"] == "error"
    assert not (tmp_path / "skipped_records.json").exists()


def test_policy_skip_keeps_exactly_the_good_records(host, plain, corpus, tmp_path):
    data, folder, bad = corpus
    module = _make(host, data, folder, tmp_path, data_check="full", data_check_policy="skip")
    ds = module["train_dataset"]
    assert len(ds) == N_GOOD and len(ds.lengths) == len(ds.modality_lengths) == N_GOOD
    ids = [r["id"] for r in ds.list_data_dict]
    assert len(set(ids)) == N_GOOD and not set(ids) & {k for k, v in bad.items() if v != "duplicate_id"}
    skipped = json.loads((tmp_path / "skipped_records.json").read_text())
    assert sorted(s["id"] for s in skipped) == sorted(bad)
    assert {s["id"]: s["reason"] for s in skipped} == bad
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (3, 64, 64)
    assert ds.runtime_skips == 0
    # a file deleted after the check: the next record is used, counted, logged
    victim = 5
    expected = ds.dataset[victim + 1]
    moved = Path(folder) / ds.list_data_dict[victim]["image"]
    saved = moved.read_bytes()
    moved.unlink()
    try:
        item = ds[victim]
        assert item["input_ids"].tolist() == expected["input_ids"].tolist()
        assert ds.runtime_skips == 1
        ds[victim]  # known bad in this process: not counted twice
        assert ds.runtime_skips == 1
        lines = (tmp_path / "runtime_skipped_records.jsonl").read_text().splitlines()
        assert json.loads(lines[0])["id"] == ds.list_data_dict[victim]["id"]
        assert json.loads(lines[0])["reason"] == "missing_image"
    finally:
        moved.write_bytes(saved)


def test_runtime_failure_under_policy_error_names_the_record(host, plain, corpus, tmp_path):
    from llava_contrastive.hosts.llava.data import DataCheckError

    data, folder, _ = corpus
    good = [r for r in json.loads(Path(data).read_text()) if r["id"].isdigit()][:4]  # tiny-corpus records
    copy = tmp_path / "good.json"
    copy.write_text(json.dumps(good))
    ds = _make(host, copy, folder, tmp_path, data_check="quick", data_check_policy="error")["train_dataset"]
    assert len(ds) == len(good)
    target = Path(folder) / good[2]["image"]
    saved = target.read_bytes()
    target.unlink()
    try:
        item = ds[2]  # policy error: the next record, flagged so that all ranks stop together
        flag = item["_bad_record"]
        assert repr(good[2]["id"]) in flag and str(target) in flag and "missing_image" in flag
        assert item["input_ids"].tolist() == ds[3]["input_ids"].tolist()
        collate = _make(host, copy, folder, tmp_path, data_check="off", data_check_policy="error")["data_collator"]
        batch = collate([ds[1], item])
        assert batch["_bad_records"] == [flag] and batch["input_ids"].shape[0] == 2
    finally:
        target.write_bytes(saved)


def test_runtime_skips_are_bounded_and_shared_by_dataloader_workers(host, plain, corpus, tmp_path):
    import torch

    from llava_contrastive.hosts.llava.data import DataCheckError, GuardedDataset

    class Flaky(torch.utils.data.Dataset):
        def __init__(self, n, bad):
            self.n, self.bad, self.list_data_dict = n, set(bad), [{"id": k, "image": f"{k}.jpg"} for k in range(n)]

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            if i in self.bad:
                raise FileNotFoundError(f"{i}.jpg")
            return torch.tensor([i])

        @property
        def lengths(self):
            return [1] * self.n

    ds = GuardedDataset(Flaky(40, {3, 4, 39}), "skip")
    assert ds.max_failures == 10 and ds.lengths == [1] * 40
    assert ds[3].item() == 5 and ds[39].item() == 0 and ds.runtime_skips == 3
    loader = torch.utils.data.DataLoader(GuardedDataset(Flaky(40, {3, 10}), "skip"), batch_size=4, num_workers=2)
    seen = torch.cat(list(loader)).tolist()
    assert len(seen) == 40 and 3 not in seen and 10 not in seen
    assert loader.dataset.runtime_skips == 2  # counted in the workers, read here
    tight = GuardedDataset(Flaky(40, set(range(20))), "skip", max_failures=5)
    with pytest.raises(DataCheckError, match="more than the limit of 5"):
        tight[0]


def test_off_skips_the_check_but_guards_the_dataset(host, plain, corpus, tmp_path):
    data, folder, bad = corpus
    module = _make(host, data, folder, tmp_path, data_check="off", data_check_policy="skip")
    assert len(module["train_dataset"]) == N_GOOD + len(bad)
    assert hasattr(module["train_dataset"], "runtime_skips")
    assert not (tmp_path / "data_check_report.json").exists()


# ----------------------------------------------------------------------------- the real CLI (slow)


def _stage1(assets, out: Path, data: Path, folder: Path, extra: list[str], nproc: int = 1):
    args = runs.stage1_args(assets, out, steps=-1, batch=BATCH // nproc, extra=[
        "--data_path", str(data), "--image_folder", str(folder), "--num_train_epochs", "1",
        "--data_check_cache", str(out.parent / f"{out.name}.cache.json"), *extra])
    return runs.run("llava_contrastive.train", args, nproc=nproc, force_launcher=nproc > 1, check=False,
                    timeout=600, log=out.parent / f"{out.name}.log")


@pytest.mark.slow
def test_cli_policy_error_stops_before_step_1(tiny_assets, tmp_path):
    data, folder, bad = bad_stage1_corpus(tmp_path / "corpus", tiny_assets)
    out = tmp_path / "error"
    proc = _stage1(tiny_assets, out, data, folder, ["--data_check", "full", "--data_check_policy", "error"])
    assert proc.returncode != 0
    for rid, reason in bad.items():
        assert any(f"id={rid!r}" in line and reason in line for line in proc.stderr.splitlines()), (rid, reason)
    assert not list(out.glob("checkpoint-*")) and not (out / "trainer_state.json").exists()
    assert not (out / "mm_projector.bin").exists()


@pytest.mark.slow
def test_cli_policy_skip_trains_on_exactly_the_good_records(tiny_assets, tmp_path):
    data, folder, bad = bad_stage1_corpus(tmp_path / "corpus", tiny_assets)
    out = tmp_path / "skip"
    proc = _stage1(tiny_assets, out, data, folder, ["--data_check", "full", "--data_check_policy", "skip"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    skipped = json.loads((out / "skipped_records.json").read_text())
    assert sorted(s["id"] for s in skipped) == sorted(bad)
    assert {s["id"]: s["reason"] for s in skipped} == bad
    state = json.loads((out / "trainer_state.json").read_text())
    steps = math.ceil(N_GOOD / BATCH)  # 3; all 35 records would need 5
    assert state["max_steps"] == state["global_step"] == steps
    assert len(runs.train_logs(out)) == steps
    report = json.loads((out / "data_check_report.json").read_text())
    assert report["n_good"] == N_GOOD and report["n_bad"] == len(bad) and report["mode"] == "full"
    assert report["mode_counts"] == {"RGB": N_GOOD - 3, "L": 1, "P": 1, "CMYK": 1}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_cli_two_ranks_check_once_and_agree(tiny_assets, tmp_path):
    """2 ranks (DeepSpeed ZeRO-2, gloo): rank 0 checks, both get its verdict: under error both exit
    (no hang); under skip both train on the same good records (global batch 8 -> 3 steps)."""
    data, folder, bad = bad_stage1_corpus(tmp_path / "corpus", tiny_assets)
    ds = ["--deepspeed", str(runs.ZERO2)]
    err = _stage1(tiny_assets, tmp_path / "error2", data, folder,
                  ["--data_check", "full", "--data_check_policy", "error", *ds], nproc=2)
    assert err.returncode != 0
    assert any("id='truncated'" in line and "truncated_image" in line for line in err.stderr.splitlines())
    assert not (tmp_path / "error2" / "trainer_state.json").exists()
    out = tmp_path / "skip2"
    ok = _stage1(tiny_assets, out, data, folder, ["--data_check", "full", "--data_check_policy", "skip", *ds], nproc=2)
    assert ok.returncode == 0, ok.stderr[-4000:]
    assert ok.stderr.count("images checked in") + ok.stdout.count("images checked in") == 1  # checked once
    assert sorted(s["id"] for s in json.loads((out / "skipped_records.json").read_text())) == sorted(bad)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["max_steps"] == state["global_step"] == math.ceil(N_GOOD / BATCH)


@pytest.mark.slow
def test_file_vanishing_mid_training_stops_all_ranks_with_a_checkpoint(tiny_assets, tmp_path):
    """--data_check off lets a missing file reach training: under policy error the run stops at
    the step that meets it, naming the record, after saving a resumable checkpoint; with the file
    back, the same command resumes."""
    import shutil

    from tests.host import runs

    records = json.loads(Path(tiny_assets.pretrain_json).read_text())[:48]
    folder = tmp_path / "images"
    for r in records:
        (folder / r["image"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(tiny_assets.image_folder) / r["image"], folder / r["image"])
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    victim = folder / records[40]["image"]
    saved = victim.read_bytes()
    victim.unlink()
    out = tmp_path / "out"
    args = runs.stage1_args(tiny_assets, out, steps=6, extra=[
        "--data_path", str(data), "--image_folder", str(folder), "--data_check", "off", "--save_steps", "1000"])
    proc = runs.run("llava_contrastive.train", args, check=False, log=tmp_path / "vanish.log")
    assert proc.returncode != 0
    assert "became unreadable at optimizer step" in proc.stderr and records[40]["id"] in proc.stderr
    ckpts = list(out.glob("checkpoint-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "mm_projector.bin").exists() and (ckpts[0] / "optimizer.pt").exists()
    stopped_at = int(ckpts[0].name.split("-")[1])
    assert 0 <= stopped_at < 6
    victim.write_bytes(saved)
    runs.run("llava_contrastive.train", args, log=tmp_path / "vanish_resume.log")
    assert [h["step"] for h in runs.train_logs(out)] == list(range(1, 7))
