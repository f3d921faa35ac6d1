"""Checkpoint manifests (training/checkpointing.py), on small synthetic checkpoint directories:
round trip, damage detection (truncated, missing, one flipped byte), fallback to the previous good
checkpoint, legacy checkpoints without a manifest, save_total_limit rotation that keeps the last
verified checkpoint, and the failed-save message."""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os

import pytest

from llava_contrastive.training import checkpointing as ck


def make_checkpoint(path, files: dict) -> str:
    """A checkpoint directory with the given {relative path: bytes} plus trainer_state.json."""
    for rel, data in {**files, ck.TRAINER_STATE_FILE: b'{"global_step": 1}'}.items():
        target = path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return str(path)


FILES = {"mm_projector.bin": bytes(range(256)) * 40, "optimizer.pt": b"moments" * 999, "rng_state.pth": b"r" * 17,
         # a DeepSpeed engine checkpoint: shards in a sub-folder, and the 'latest' tag file
         "global_step4/mp_rank_00_model_states.pt": b"shard" * 300, "latest": b"global_step4"}


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    d = make_checkpoint(tmp_path / "checkpoint-4", FILES)
    written = ck.write_manifest(d)
    with open(os.path.join(d, ck.MANIFEST_FILE)) as f:
        on_disk = json.load(f)
    assert on_disk == written
    expected = {rel: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                for rel, data in {**FILES, ck.TRAINER_STATE_FILE: b'{"global_step": 1}'}.items()}
    assert on_disk == {"version": 1, "files": expected}
    assert not [n for n in os.listdir(d) if n.endswith(".tmp")]  # written atomically, nothing left over
    assert ck.verify_checkpoint(d) is None


@pytest.mark.parametrize("damage, reason", [
    ("truncate", "truncated: optimizer.pt is 3496 bytes, the manifest says 6993"),
    ("missing", "missing file global_step4/mp_rank_00_model_states.pt"),
    ("flip", "checksum mismatch: mm_projector.bin"),
    ("grow", "size differs: rng_state.pth is 18 bytes, the manifest says 17"),
    ("manifest", "manifest.json unreadable"),
])
def test_damage_is_detected_with_its_reason(tmp_path, damage, reason):
    d = make_checkpoint(tmp_path / "checkpoint-4", FILES)
    ck.write_manifest(d)
    if damage == "truncate":
        os.truncate(os.path.join(d, "optimizer.pt"), len(FILES["optimizer.pt"]) // 2)
    elif damage == "missing":
        os.remove(os.path.join(d, "global_step4", "mp_rank_00_model_states.pt"))
    elif damage == "flip":  # same size, one byte changed
        path = os.path.join(d, "mm_projector.bin")
        data = bytearray(open(path, "rb").read())
        data[1234] ^= 0x01
        open(path, "wb").write(bytes(data))
    elif damage == "grow":
        with open(os.path.join(d, "rng_state.pth"), "ab") as f:
            f.write(b"x")
    else:
        with open(os.path.join(d, ck.MANIFEST_FILE), "w") as f:
            f.write('{"files": {"a": ')  # half a manifest
    got = ck.verify_checkpoint(d)
    assert got is not None and got.startswith(reason), got


def test_manifest_path_outside_the_checkpoint_is_refused(tmp_path):
    d = make_checkpoint(tmp_path / "checkpoint-2", {"a.bin": b"a"})
    (tmp_path / "outside.bin").write_bytes(b"o")
    manifest = ck.build_manifest(d)
    manifest["files"]["../outside.bin"] = {"size": 1, "sha256": hashlib.sha256(b"o").hexdigest()}
    (tmp_path / "checkpoint-2" / ck.MANIFEST_FILE).write_text(json.dumps(manifest))
    assert "outside the checkpoint" in ck.verify_checkpoint(d)


def test_newest_damaged_checkpoint_falls_back_to_the_previous_good_one(tmp_path, caplog):
    out = tmp_path / "run"
    for step in (2, 4, 6):
        ck.write_manifest(make_checkpoint(out / f"checkpoint-{step}", {"optimizer.pt": bytes([step]) * 100}))
    assert ck.last_complete_checkpoint(str(out)) == str(out / "checkpoint-6")
    os.truncate(out / "checkpoint-6" / "optimizer.pt", 10)
    (out / "checkpoint-4" / "optimizer.pt").unlink()
    with caplog.at_level(logging.WARNING, logger="llava_contrastive"):
        assert ck.last_complete_checkpoint(str(out)) == str(out / "checkpoint-2")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"checkpoint {out / 'checkpoint-6'} is damaged (truncated: optimizer.pt is 10 bytes, the manifest says 100): "
        "falling back to the previous checkpoint",
        f"checkpoint {out / 'checkpoint-4'} is damaged (missing file optimizer.pt): falling back to the previous "
        "checkpoint"]
    (out / "checkpoint-2" / "optimizer.pt").write_bytes(bytes([9]) * 100)  # same size, other content
    assert ck.last_complete_checkpoint(str(out)) is None


def test_legacy_checkpoint_without_manifest_counts_as_complete(tmp_path, caplog):
    out = tmp_path / "run"
    legacy = make_checkpoint(out / "checkpoint-3", {"optimizer.pt": b"o" * 10})
    with caplog.at_level(logging.INFO, logger="llava_contrastive"):
        assert ck.verify_checkpoint(legacy) is None
    assert any("saved before manifests existed" in r.getMessage() for r in caplog.records)
    bare = out / "checkpoint-5"  # neither manifest nor trainer state: an interrupted unstaged save
    bare.mkdir()
    assert "incomplete" in ck.verify_checkpoint(str(bare))
    assert ck.last_complete_checkpoint(str(out)) == legacy


def test_cleaning_keeps_a_damaged_checkpoint_that_had_a_manifest(tmp_path):
    """A checkpoint that lost trainer_state.json after it was sealed is damaged, not an interrupted
    save: it is kept (and skipped with a warning), whereas an unsealed one without it is removed."""
    out = tmp_path / "run"
    ck.write_manifest(make_checkpoint(out / "checkpoint-2", {"a": b"a"}))
    ck.write_manifest(make_checkpoint(out / "checkpoint-4", {"a": b"b"}))
    (out / "checkpoint-4" / ck.TRAINER_STATE_FILE).unlink()
    (out / "checkpoint-6").mkdir()
    removed = ck.clean_incomplete_checkpoints(str(out))
    assert removed == [str(out / "checkpoint-6")]
    assert ck.verify_checkpoint(str(out / "checkpoint-4")) == f"missing file {ck.TRAINER_STATE_FILE}"
    assert ck.last_complete_checkpoint(str(out)) == str(out / "checkpoint-2")


def _plain_rotation(checkpoints, limit, protected):
    """Reference: keep the newest `limit` plus every protected one, delete the rest (oldest first)."""
    keep = set(checkpoints[-limit:]) | {p for p in protected if p}
    return [c for c in checkpoints if c not in keep]


@pytest.mark.parametrize("limit, protected, expected", [
    (2, [], ["c-2", "c-4"]),
    (1, ["c-4"], ["c-2", "c-6"]),  # the last verified one survives; still only limit + protected kept
    (2, ["c-2", "c-4"], ["c-6"]),  # two protected + the newest: 3 kept although the limit is 2
    (1, ["c-8"], ["c-2", "c-4", "c-6"]),  # protecting the newest changes nothing
    (None, ["c-4"], []), (0, [], []),  # no limit: nothing deleted
    (10, [], []),
    (1, ["elsewhere/c-4"], ["c-2", "c-4", "c-6"]),  # a protected path that is not among them
])
def test_rotation_never_deletes_the_newest_nor_a_protected_checkpoint(limit, protected, expected):
    checkpoints = ["c-2", "c-4", "c-6", "c-8"]
    got = ck.rotation_victims(checkpoints, limit, protected)
    assert got == expected
    if limit:
        # the same as the plain reference whenever the protected ones fit in the limit
        kept = [c for c in checkpoints if c not in got]
        assert "c-8" in kept and all(p in kept for p in protected if p in checkpoints)
        if len(set(protected) & set(checkpoints) - {"c-8"}) < limit:
            assert got == _plain_rotation(checkpoints, limit, [p for p in protected if p in checkpoints])


def test_save_failure_message_names_path_free_and_needed_space(tmp_path):
    err = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "tmp-checkpoint-8" / "optimizer.pt"))
    msg = ck.save_failure_message(err, str(tmp_path / "checkpoint-8"), needed=3 * 2 ** 20, needed_from="the size of "
                                  "checkpoint-6", free=2 ** 19, previous=str(tmp_path / "checkpoint-6"))
    assert f"saving {tmp_path / 'checkpoint-8'} failed, the disk is full: No space left on device" in msg
    assert "tmp-checkpoint-8/optimizer.pt" in msg and "Free space on" in msg and "0.5 MB" in msg
    assert "needs about 3.0 MB (the size of checkpoint-6)" in msg
    assert f"the previous checkpoint {tmp_path / 'checkpoint-6'} is intact" in msg
    other = ck.save_failure_message(OSError(errno.EIO, "Input/output error"), "ck", needed=0, needed_from="x",
                                    free=None, previous=None)
    assert "a write failed" in other and "starts from step 0" in other and "unknown" in other


def test_free_bytes_and_dir_bytes(tmp_path):
    make_checkpoint(tmp_path / "c", {"a/b.bin": b"x" * 1000})
    assert ck.dir_bytes(str(tmp_path / "c")) == 1000 + len(b'{"global_step": 1}')
    assert ck.dir_bytes(str(tmp_path / "nope")) == 0
    free = ck.free_bytes(str(tmp_path / "not" / "yet" / "there"))  # nearest existing parent
    assert free is not None and free > 0
