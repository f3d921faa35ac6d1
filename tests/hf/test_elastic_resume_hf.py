"""The native host's stage 1 resumed on another number of ranks (issue 16; the upstream host's cases
and the exact equality that holds are in tests/host/test_elastic_resume.py): killed while writing
checkpoint-6, resumed from checkpoint-3 (mid-epoch) on 1 rank x 6 x 2 accumulation, with and
without ZeRO-3, every per-step loss equals the uninterrupted 2-rank run's."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hf.test_resume import logs, run, train_args
from host.runs import free_port

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
ZERO3 = Path(__file__).resolve().parents[2] / "scripts" / "zero3.json"


@pytest.fixture(scope="module")
def records(tiny_assets, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("elastic") / "records48.json"
    path.write_text(json.dumps(json.loads(Path(tiny_assets.pretrain_json).read_text())[:48]))
    return path


def args(tiny_assets, native_dir, records, out, nproc, zero):
    extra = ["--data_path", str(records), "--elastic_data_order", "true", "--contrastive_gather", "false",
             "--gradient_accumulation_steps", str(2 // nproc), "--use_cpu", "true"]
    if zero:
        extra += ["--deepspeed", str(ZERO3)]
    return train_args(tiny_assets, native_dir, out, steps=6, save=3, batch=6, extra=extra)


@pytest.fixture(scope="module")
def reference(tiny_assets, native_dir, records, tmp_path_factory):
    out = tmp_path_factory.mktemp("elastic-ref") / "ref"
    run(args(tiny_assets, native_dir, records, out, 2, False), nproc=2, log=out.parent / "ref.log")
    return out


@pytest.mark.parametrize("zero", [False, True], ids=["plain", "zero3"])
def test_two_ranks_killed_then_resumed_on_one_continue_the_same_run(tiny_assets, native_dir, records, reference,
                                                                    tmp_path, zero):
    out = tmp_path / "run"
    killed = run(args(tiny_assets, native_dir, records, out, 2, zero), nproc=2, check=False,
                 log=tmp_path / "killed.log", LLAVA_CONTRASTIVE_FAULTS="kill_in_save@6")
    assert killed.returncode != 0 and (out / "checkpoint-3" / "elastic_optimizer.pt").is_file()
    # one rank under DeepSpeed: the rendezvous variables a launcher sets (else DeepSpeed looks for MPI)
    rendezvous = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port())) if zero else {}
    resumed = run(args(tiny_assets, native_dir, records, out, 1, zero), nproc=1, log=tmp_path / "resumed.log",
                  **rendezvous)
    assert f"resuming {out / 'checkpoint-3'} (written by 2 rank(s)" in resumed.stderr, resumed.stderr[-3000:]
    mine, ref = logs(out), logs(reference)
    assert [h["step"] for h in mine] == [h["step"] for h in ref] == list(range(1, 7))
    for a, b in zip(mine, ref):
        for key in ("loss", "ntp_loss", "contrastive_loss"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (key, a, b)
    p, q = (torch.load(d / "mm_projector.bin", weights_only=True) for d in (out, reference))
    for k in q:
        torch.testing.assert_close(p[k], q[k], rtol=0, atol=1e-6)
