"""Distributed losses vs the 1-process global computation (gloo, CPU).

One spawned process group per world size runs every scenario of _dist_worker.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from tests.core import _dist_worker as worker

pytestmark = pytest.mark.distributed

NAMES = list(worker.SCENARIOS)
GOOD = [n for n in NAMES if not worker.SCENARIOS[n].get("broken")]
ATOL = RTOL = 1e-6


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, tmp_path_factory) -> dict:
    path = str(tmp_path_factory.mktemp(f"dist{world}") / "results.pt")
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        mp.spawn(worker.run, args=(world, _free_port(), NAMES, path), nprocs=world, join=True)
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
    return torch.load(path)


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def dist_results(request, tmp_path_factory) -> tuple[int, dict]:
    return request.param, _spawn(request.param, tmp_path_factory)


def _flat(res: dict) -> dict[str, torch.Tensor]:
    out = {"loss": res["loss"], "x_img_grad": res["x_img_grad"], "x_txt_grad": res["x_txt_grad"]}
    out.update({f"grad_{k}": v for k, v in res["params"].items()})
    out.update({f"queue_{k}": v for k, v in res.get("queue_state", {}).items()})
    return out


def _mismatches(got: dict, ref: dict) -> list[str]:
    bad = []
    a, b = _flat(got), _flat(ref)
    assert a.keys() == b.keys()
    for k in a:
        if a[k].shape != b[k].shape or not torch.allclose(a[k], b[k], atol=ATOL, rtol=RTOL):
            bad.append(k)
    return bad


@pytest.mark.parametrize("name", GOOD)
def test_matches_single_process(dist_results, name: str) -> None:
    world, results = dist_results
    got, ref = results[name], worker.reference(name, world)
    assert _mismatches(got, ref) == []
    # The check is not vacuous: real scenarios have non-zero gradients.
    if "single_row" not in name:
        assert ref["x_img_grad"].abs().max() > 1e-3
        assert ref["params"]["log_scale"].abs() > 0


@pytest.mark.parametrize("name", [n for n in GOOD if "single_row" in n])
def test_single_row_is_connected_zero(dist_results, name: str) -> None:
    world, results = dist_results
    got = _flat(results[name])
    for k, v in got.items():
        if not k.startswith("queue_"):
            assert torch.count_nonzero(v) == 0, k


def test_broken_image_gather_is_detected(dist_results) -> None:
    world, results = dist_results
    name = "broken_image_gather"
    bad = _mismatches(results[name], worker.reference(name, world))
    assert "loss" not in bad  # forward is identical ...
    assert "x_img_grad" in bad and "grad_w_img" in bad  # ... gradients are not


def test_queue_state_identical_after_enqueue_from_local(dist_results) -> None:
    world, results = dist_results
    state = results["queue"]["queue_state"]
    assert int(state["filled"]) == worker.QUEUE_SIZE
    ref = worker.reference("queue", world)["queue_state"]
    for k in ref:
        torch.testing.assert_close(state[k], ref[k], atol=ATOL, rtol=RTOL)
