"""Stage 1 resumed on another number of ranks, with and without DeepSpeed (issue 16).

A run is killed while it writes checkpoint-6 (after checkpoint-3, which is mid-epoch: 48 records,
global batch 12, 4 steps per epoch) and the same command is resumed with another world size. The
global batch stays 12 and every micro-batch stays the same (6 per device: 2 ranks x 6, or 1 rank x 6
x 2 accumulation; 3 ranks x 4, or 1 x 4 x 3) with per-micro-batch negatives, so the exact equality
that holds is: every per-step loss equals the uninterrupted run's to 1e-5 and the final projector to
1e-6 (training/elastic.py says why other splits cannot be equal and what they keep)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pytest
import torch

from llava_contrastive.training.elastic import SHAPE_FILE, STATE_FILE
from tests.host import runs

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(900)]
STEPS, SAVE, GLOBAL = 6, 3, 12


@pytest.fixture(scope="module")
def records(tiny_assets, work) -> Path:
    path = work / "elastic48.json"
    path.write_text(json.dumps(json.loads(Path(tiny_assets.pretrain_json).read_text())[:48]))
    return path


def args_for(tiny_assets, records, out: Path, nproc: int, per_device: int, zero: Optional[str]) -> list[str]:
    accum = GLOBAL // (nproc * per_device)
    args = runs.stage1_args(tiny_assets, out, steps=STEPS, batch=per_device, extra=[
        "--data_path", str(records), "--save_steps", str(SAVE), "--elastic_data_order", "True",
        "--contrastive_gather", "False"])
    i = args.index("--gradient_accumulation_steps")
    args[i + 1] = str(accum)
    if zero:
        args += ["--deepspeed", str(getattr(runs, zero))]
    return args


def train(tiny_assets, records, out, nproc, per_device, zero, **kw):
    return runs.run("llava_contrastive.train", args_for(tiny_assets, records, out, nproc, per_device, zero),
                    nproc=nproc, force_launcher=nproc > 1 or bool(zero), log=out.parent / f"{out.name}.log", **kw)


@pytest.fixture(scope="module")
def reference(tiny_assets, records, work) -> Path:
    """Uninterrupted, 2 ranks x 6, no DeepSpeed."""
    out = work / "elastic_ref"
    train(tiny_assets, records, out, 2, 6, None)
    return out


@pytest.fixture(scope="module")
def reference_by_4(tiny_assets, records, work) -> Path:
    """Uninterrupted, 1 rank x 4 x 3 accumulation (the micro-batches of 3 ranks x 4)."""
    out = work / "elastic_ref4"
    train(tiny_assets, records, out, 1, 4, None)
    return out


def killed_then_resumed(tiny_assets, records, work, name, before, after) -> Path:
    out = work / name
    (n0, b0, z0), (n1, b1, z1) = before, after
    killed = train(tiny_assets, records, out, n0, b0, z0, check=False,
                   extra_env={"LLAVA_CONTRASTIVE_FAULTS": f"kill_in_save@{STEPS}"})
    assert killed.returncode != 0 and not (out / f"checkpoint-{STEPS}").exists(), killed.stderr[-2000:]
    ck = out / f"checkpoint-{SAVE}"
    assert (ck / STATE_FILE).is_file() and (ck / SHAPE_FILE).is_file()
    assert json.loads((ck / SHAPE_FILE).read_text())["world_size"] == n0
    resumed = train(tiny_assets, records, out, n1, b1, z1)
    assert f"resuming {ck} (written by {n0} rank(s)" in resumed.stderr, resumed.stderr[-3000:]
    return out


def assert_same_run(out: Path, reference: Path) -> None:
    mine, ref = runs.train_logs(out), runs.train_logs(reference)
    assert [h["step"] for h in mine] == [h["step"] for h in ref] == list(range(1, STEPS + 1))
    for a, b in zip(mine, ref):
        for key in ("loss", "ntp_loss", "contrastive_loss"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (key, a, b)
        assert a["learning_rate"] == pytest.approx(b["learning_rate"], rel=1e-9)
    p, q = (torch.load(d / "mm_projector.bin", weights_only=True) for d in (out, reference))
    assert sorted(p) == sorted(q)
    for k in q:
        torch.testing.assert_close(p[k], q[k], rtol=0, atol=1e-6)


CASES = {  # name: ((ranks, per device, DeepSpeed) killed, (...) resumed)
    "2to1": ((2, 6, None), (1, 6, None)),
    "1to2": ((1, 6, None), (2, 6, None)),
    "zero2_2to1": ((2, 6, "ZERO2"), (1, 6, "ZERO2")),
    "zero2_2to1_plain": ((2, 6, "ZERO2"), (1, 6, None)),
    "zero3_2to1": ((2, 6, "ZERO3"), (1, 6, "ZERO3")),
    "plain_1to2_zero3": ((1, 6, None), (2, 6, "ZERO3")),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_resumed_on_another_world_size_continues_the_same_run(tiny_assets, records, work, reference, name):
    before, after = CASES[name]
    assert_same_run(killed_then_resumed(tiny_assets, records, work, name, before, after), reference)


def test_three_ranks_to_one(tiny_assets, records, work, reference_by_4):
    out = killed_then_resumed(tiny_assets, records, work, "3to1", (3, 4, None), (1, 4, None))
    assert_same_run(out, reference_by_4)


def test_another_global_batch_is_refused_naming_the_fix(tiny_assets, records, work, reference):
    out = work / "other_batch"
    killed = train(tiny_assets, records, out, 2, 6, None, check=False,
                   extra_env={"LLAVA_CONTRASTIVE_FAULTS": f"kill_in_save@{STEPS}"})
    assert killed.returncode != 0
    args = args_for(tiny_assets, records, out, 1, 6, None)
    args[args.index("--gradient_accumulation_steps") + 1] = "1"  # global batch 6 instead of 12
    proc = runs.run("llava_contrastive.train", args, check=False, log=work / "other_batch_resume.log")
    # pre-flight, before any model loads (exit 2); the trainer refuses it too (tests/core/test_elastic.py)
    assert proc.returncode == 2 and "nothing was loaded" in proc.stderr, proc.stderr[-3000:]
    assert "global_batch 12 -> 6" in proc.stderr
    assert "to resume on 1 rank(s), keep the global batch 12 with --per_device_train_batch_size 12" in proc.stderr
    assert (out / f"checkpoint-{SAVE}").is_dir()  # nothing lost
