"""Files this project reads back: weights_only / safetensors, and clear errors for misfits."""
from __future__ import annotations

import pickle

import pytest
import torch

from llava_contrastive.hosts.llava import checkpoint as ckpt

from tests.host import runs


def test_expected_shapes_match_upstream_builder():
    from types import SimpleNamespace

    from llava.model.multimodal_projector.builder import build_vision_projector

    for kind in ("linear", "mlp2x_gelu", "mlp3x_gelu"):
        module = build_vision_projector(SimpleNamespace(mm_projector_type=kind, mm_hidden_size=24, hidden_size=40))
        assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == ckpt.expected_projector_shapes(kind, 24, 40)


def test_projector_file_that_does_not_fit_fails_before_training(tiny_assets, work):
    bad = work / "wrong_shape.bin"
    torch.save({"model.mm_projector.0.weight": torch.zeros(64, 32), "model.mm_projector.0.bias": torch.zeros(64),
                "model.mm_projector.2.weight": torch.zeros(64, 64), "model.mm_projector.2.bias": torch.zeros(64)}, bad)
    out = work / "wrong_shape_run"
    proc = runs.run("llava_contrastive.train", runs.stage1_args(tiny_assets, out, steps=2, extra=[
        "--pretrain_mm_mlp_adapter", str(bad)]), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr  # a user error: one message, before the model loads
    assert str(bad) in proc.stderr and "do not fit --mm_projector_type mlp2x_gelu" in proc.stderr
    assert not (out / "trainer_state.json").exists()


def test_projector_files_are_loaded_without_unpickling_code(work):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = work / "evil.bin"
    with open(path, "wb") as f:
        pickle.dump({"model.mm_projector.0.weight": Evil()}, f)
    with pytest.raises(ValueError, match="not a readable projector file"):
        ckpt.load_projector_state(str(path))


def test_head_from_another_configuration_is_refused(tiny_assets, joint_run, work):
    from types import SimpleNamespace

    from llava_contrastive.core.config import ContrastiveArguments
    from llava_contrastive.core.head import ContrastiveHead

    model = SimpleNamespace(contrastive_args=ContrastiveArguments(contrastive_loss="siglip"))
    model.contrastive_head = ContrastiveHead(model.contrastive_args, 64)
    with pytest.raises(ValueError, match="another configuration: --contrastive_loss saved 'infonce' vs now 'siglip'"):
        ckpt.load_head(model, str(joint_run))
    model = SimpleNamespace(contrastive_args=ContrastiveArguments())
    model.contrastive_head = ContrastiveHead(model.contrastive_args, 64)
    ckpt.load_head(model, str(joint_run))  # the same configuration loads
