"""--mm_projector_init: the stage-1 projector's start (upstream's nn.Linear defaults or N(0, std))."""
from __future__ import annotations

import pytest
import torch

from llava_contrastive.hosts.common import normal_init_
from llava_contrastive.hosts.llava.args import check_projector_init
from tests.host import runs


def _mlp() -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))


def test_normal_init_is_seeded_and_leaves_the_global_rng_alone():
    a, b, c = _mlp(), _mlp(), _mlp()
    state = torch.get_rng_state()
    normal_init_(a, 0.02, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    normal_init_(b, 0.02, seed=3)
    normal_init_(c, 0.02, seed=4)
    for la, lb, lc in zip(a, b, c):
        if isinstance(la, torch.nn.Linear):
            assert torch.equal(la.weight, lb.weight) and not torch.equal(la.weight, lc.weight)
            assert la.weight.std().item() == pytest.approx(0.02, rel=0.1)
            assert abs(la.weight.mean().item()) < 0.003 and torch.count_nonzero(la.bias) == 0


def test_refusals():
    check_projector_init("upstream", 0.02, "some/mm_projector.bin")  # stage 2: fine
    with pytest.raises(ValueError, match="not one of upstream, normal"):
        check_projector_init("xavier", 0.02, None)
    with pytest.raises(ValueError, match="would overwrite the projector loaded from --pretrain_mm_mlp_adapter"):
        check_projector_init("normal", 0.02, "p/mm_projector.bin")
    with pytest.raises(ValueError, match="must be > 0"):
        check_projector_init("normal", 0.0, None)


def test_stage1_starts_from_the_normal_init(tiny_assets, tmp_path):
    """The flag reaches upstream's train(): after one step at a negligible learning rate the saved
    projector is the seeded N(0, 0.03) start, not nn.Linear's."""
    out = tmp_path / "run"
    args = runs.stage1_args(tiny_assets, out, steps=1, batch=4,
                            extra=["--mm_projector_init", "normal", "--mm_projector_init_std", "0.03"])
    args[args.index("--learning_rate") + 1] = "1e-12"
    runs.run("llava_contrastive.train", args)
    saved = torch.load(out / "mm_projector.bin", map_location="cpu", weights_only=True)
    expected = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
    normal_init_(expected, 0.03, seed=7)
    for i in (0, 2):
        torch.testing.assert_close(saved[f"model.mm_projector.{i}.weight"].float(), expected[i].weight, atol=1e-8, rtol=0)
        assert saved[f"model.mm_projector.{i}.bias"].abs().max() < 1e-8
