"""Helper for tests/core/test_distributed.py, run inside spawned gloo processes.

Each scenario builds a deterministic global batch (image/text raw features fed
through tiny linear layers whose weights are identical on all ranks). A rank
works on its shard; the 1-process reference works on the whole batch. Both
return the same quantities, made comparable as DDP would see them:
  * loss: mean over ranks,
  * raw-feature grads: concatenated in rank order, divided by world,
  * parameter grads (linear weights, log scale, bias): averaged over ranks.
"""
from __future__ import annotations

import contextlib
import os
import sys
from datetime import timedelta

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from llava_contrastive.core import losses  # noqa: E402
from llava_contrastive.core.distributed import all_reduce_sum, gather_rows  # noqa: E402
from llava_contrastive.core.losses import info_nce_loss, siglip_loss  # noqa: E402
from llava_contrastive.core.text_queue import TextQueue, info_nce_loss_with_queue  # noqa: E402


@contextlib.contextmanager
def broken_image_gather(enabled: bool):
    """The bug the distributed test must catch: image columns gathered without autograd."""
    if not enabled:
        yield
        return
    original = losses._gather_cols

    def gather_without_image_grad(x, b, with_grad):
        return original(x, b, with_grad=with_grad and x is not b.img)

    losses._gather_cols = gather_without_image_grad
    try:
        yield
    finally:
        losses._gather_cols = original

D_IN, D = 6, 4
QUEUE_SIZE = 5

# name -> options. "counts" maps world size -> rows per rank.
SCENARIOS: dict[str, dict] = {
    "infonce": dict(loss="infonce", counts={2: [3, 3], 3: [2, 2, 2]}),
    "infonce_keys": dict(loss="infonce", keys=True, counts={2: [3, 3], 3: [2, 2, 2]}),
    "infonce_frozen_text": dict(loss="infonce", frozen_text=True, counts={2: [3, 3], 3: [2, 2, 2]}),
    "infonce_unequal": dict(loss="infonce", keys=True, counts={2: [4, 1], 3: [3, 1, 0]}),
    "infonce_single_row": dict(loss="infonce", counts={2: [1, 0], 3: [0, 1, 0]}),
    "siglip": dict(loss="siglip", counts={2: [3, 3], 3: [2, 2, 2]}),
    "siglip_keys_unequal": dict(loss="siglip", keys=True, counts={2: [1, 4], 3: [3, 1, 0]}),
    "siglip_single_row": dict(loss="siglip", counts={2: [0, 1], 3: [1, 0, 0]}),
    "queue": dict(loss="queue", keys=True, counts={2: [3, 2], 3: [2, 0, 2]}),
    "broken_image_gather": dict(loss="infonce", broken=True, counts={2: [3, 3], 3: [2, 2, 2]}),
}


def make_inputs(name: str, world: int) -> dict:
    """Deterministic global inputs of a scenario (identical in every process)."""
    opt = SCENARIOS[name]
    counts = opt["counts"][world]
    n = sum(counts)
    g = torch.Generator().manual_seed(1234 + 17 * world + sum(map(ord, name)))
    inp = dict(
        counts=counts,
        x_img=torch.randn(n, D_IN, generator=g),
        x_txt=torch.randn(n, D_IN, generator=g),
        w_img=torch.randn(D, D_IN, generator=g),
        w_txt=torch.randn(D, D_IN, generator=g),
        log_scale=torch.tensor(1.7),
        bias=torch.tensor(-2.0),
        keys=None,
    )
    if opt.get("keys"):
        # Repeated keys across rank boundaries (rows 0, 2, n-1 share key 7).
        keys = torch.arange(100, 100 + n)
        for i in (0, 2, n - 1):
            if i < n:
                keys[i] = 7
        inp["keys"] = keys
    if opt["loss"] == "queue":
        inp["queue_embeds"] = torch.randn(QUEUE_SIZE - 1, D, generator=g)
        inp["queue_keys"] = torch.tensor([7, 1, 101, 2])[: QUEUE_SIZE - 1]
    return inp


def compute(name: str, inp: dict, rows: slice) -> dict:
    """Forward + backward on ``rows`` of the global batch. Returns raw results."""
    opt = SCENARIOS[name]
    x_img = inp["x_img"][rows].clone().requires_grad_(True)
    x_txt = inp["x_txt"][rows].clone().requires_grad_(not opt.get("frozen_text"))
    w_img = inp["w_img"].clone().requires_grad_(True)
    w_txt = inp["w_txt"].clone().requires_grad_(not opt.get("frozen_text"))
    log_scale = inp["log_scale"].clone().requires_grad_(True)
    bias = inp["bias"].clone().requires_grad_(True)
    keys = None if inp["keys"] is None else inp["keys"][rows]
    img, txt = x_img @ w_img.T, x_txt @ w_txt.T
    scale = log_scale.exp()
    out: dict = {}
    if opt["loss"] == "siglip":
        loss = siglip_loss(img, txt, scale, bias, duplicate_keys=keys)
    elif opt["loss"] == "queue":
        q = TextQueue(QUEUE_SIZE, D)
        q.enqueue(inp["queue_embeds"], inp["queue_keys"])
        loss = info_nce_loss_with_queue(img, txt, scale, q, duplicate_keys=keys)
        q.enqueue_from_local(txt, keys)  # wraps around: 4 + n > 5
        out["queue_state"] = {k: v.clone() for k, v in q.state_dict().items()}
    else:
        with broken_image_gather(bool(opt.get("broken"))):
            loss = info_nce_loss(img, txt, scale, duplicate_keys=keys)
    loss.backward()

    def grad(t: torch.Tensor) -> torch.Tensor:
        return t.grad if t.grad is not None else torch.zeros_like(t)

    out.update(
        loss=loss.detach(),
        x_img_grad=grad(x_img),
        x_txt_grad=grad(x_txt),
        params={
            "w_img": grad(w_img),
            "w_txt": grad(w_txt),
            "log_scale": grad(log_scale),
            "bias": grad(bias),
        },
    )
    return out


def reference(name: str, world: int) -> dict:
    """1-process result on the whole batch (torch.distributed not initialised)."""
    return compute(name, make_inputs(name, world), slice(None))


def _reduce(res: dict, world: int) -> dict:
    """Make a rank's raw results comparable to the reference (see module doc)."""
    out = dict(res)
    out["loss"] = all_reduce_sum(res["loss"]) / world
    out["x_img_grad"] = gather_rows(res["x_img_grad"], with_grad=False)[0] / world
    out["x_txt_grad"] = gather_rows(res["x_txt_grad"], with_grad=False)[0] / world
    out["params"] = {k: all_reduce_sum(v) / world for k, v in res["params"].items()}
    return out


def run(rank: int, world: int, port: int, names: list[str], result_path: str) -> None:
    """Entry point for torch.multiprocessing.spawn: all scenarios in one group."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        results = {}
        for name in names:
            inp = make_inputs(name, world)
            counts = inp["counts"]
            start = sum(counts[:rank])
            res = compute(name, inp, slice(start, start + counts[rank]))
            results[name] = _reduce(res, world)
        dist.barrier()
        if rank == 0:
            torch.save(results, result_path)
    finally:
        dist.destroy_process_group()
    # gloo's background threads sporadically abort ("terminate called without an
    # active exception") during interpreter teardown; results are saved, so skip it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
