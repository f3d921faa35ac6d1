"""Read back what the loggers wrote: TensorBoard event files and a W&B offline run (used by
tests/host/test_loggers.py and tests/hf/test_loggers_hf.py)."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Dict, List, Tuple

# the joint-loss metrics both trainers log each logging step (README "Loggers")
JOINT_KEYS = ("ntp_loss", "contrastive_loss", "logit_scale", "i2t_acc")
_BLOCK, _HEADER = 32768, 7  # W&B's .wandb file: LevelDB log blocks after a 7-byte file header
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def tensorboard_scalars(log_dir: Path) -> Dict[str, List[Tuple[int, float]]]:
    """{tag: [(step, value)]} of every event file under log_dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: Dict[str, List[Tuple[int, float]]] = {}
    for events in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def _wandb_records(data: bytes) -> List[bytes]:
    """The payloads of a .wandb file (LevelDB log format: per record crc32, length, type; records may
    span blocks as FIRST/MIDDLE/LAST pieces; a block's tail shorter than a header is padding)."""
    if data[:4] != b":W&B":
        raise ValueError("not a .wandb file")
    pos, records, pending = _HEADER, [], b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        payload = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 0 and length == 0:
            pos += _BLOCK - pos % _BLOCK if pos % _BLOCK else 0
            continue
        if kind == _FULL:
            records.append(payload)
        elif kind == _FIRST:
            pending = payload
        elif kind == _MIDDLE:
            pending += payload
        elif kind == _LAST:
            records.append(pending + payload)
            pending = b""
    return records


def wandb_history(wandb_dir: Path) -> List[Dict[str, object]]:
    """The history rows ({key: value}) of the offline run(s) under wandb_dir, in logging order."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for run_file in sorted(Path(wandb_dir).rglob("run-*.wandb")):
        for payload in _wandb_records(run_file.read_bytes()):
            record = pb.Record()
            record.ParseFromString(payload)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def logged_rows(trainer_state: Path) -> List[dict]:
    """Per-step rows of trainer_state.json that carry the joint-loss metrics."""
    history = json.loads(Path(trainer_state).read_text())["log_history"]
    return [h for h in history if "ntp_loss" in h]


def check_tensorboard(run_dir: Path, steps: List[int]) -> None:
    """run_dir/tb holds each joint key at ``steps`` with trainer_state.json's values."""
    import pytest

    scalars = tensorboard_scalars(run_dir / "tb")
    rows = logged_rows(run_dir / "trainer_state.json")
    assert [h["step"] for h in rows] == steps
    for key in JOINT_KEYS:
        assert [step for step, _ in scalars[f"train/{key}"]] == steps, key
        assert [v for _, v in scalars[f"train/{key}"]] == pytest.approx([h[key] for h in rows], rel=1e-6), key


def check_wandb(run_dir: Path, steps: List[int]) -> None:
    """The W&B offline run under run_dir/wandb holds each joint key at ``steps`` with trainer_state.json's values."""
    import pytest

    history = [r for r in wandb_history(run_dir / "wandb") if "train/ntp_loss" in r]
    rows = logged_rows(run_dir / "trainer_state.json")
    assert [r["train/global_step"] for r in history] == steps
    for key in JOINT_KEYS:
        assert [r[f"train/{key}"] for r in history] == pytest.approx([h[key] for h in rows], rel=1e-6), key
