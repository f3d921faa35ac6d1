"""training/elastic.py: the world-size-independent data order, the resume decision, and the
optimizer state by parameter name (plain torch here; DeepSpeed in tests/host/test_elastic_resume.py)."""
from __future__ import annotations

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard

from llava_contrastive.training import elastic
from llava_contrastive.training.elastic import RunShape, SeededOrderSampler, resume_plan


def step_samples(n: int, seed: int, epoch: int, world: int, per_device: int, accum: int) -> list[list[int]]:
    """The samples of each optimizer step, as accelerate shards the loader over ``world`` ranks
    (its BatchSamplerShard: rank r takes batches r, r + world, ...)."""
    sampler = SeededOrderSampler(n, seed)
    sampler.set_epoch(epoch)
    base = torch.utils.data.BatchSampler(sampler, per_device, drop_last=False)
    ranks = []
    for r in range(world):
        sampler.set_epoch(epoch)
        ranks.append(list(BatchSamplerShard(base, num_processes=world, process_index=r, split_batches=False)))
    micro = len(ranks[0])
    steps = []
    for s in range(micro // accum):
        batch = []
        for a in range(accum):
            for r in range(world):
                batch += ranks[r][s * accum + a]
        steps.append(sorted(batch))
    return steps


def test_order_depends_on_seed_and_epoch_only():
    a, b = SeededOrderSampler(50, 7), SeededOrderSampler(50, 7)
    assert list(a) == list(b) == a.order(0)
    assert sorted(a.order(0)) == list(range(50))
    assert list(a) == a.order(1) != a.order(0)  # a second pass is the next epoch
    b.set_epoch(1)
    assert list(b) == a.order(1)
    assert SeededOrderSampler(50, 8).order(0) != a.order(0)
    torch.manual_seed(0)
    first = SeededOrderSampler(50, 7).order(3)
    torch.manual_seed(1)  # the global RNG plays no part
    assert SeededOrderSampler(50, 7).order(3) == first


@pytest.mark.parametrize("epoch", [0, 1])
def test_every_optimizer_step_sees_the_same_samples_on_any_world_size(epoch):
    """Global batch 12 split as 1 x 12, 1 x 6 x 2, 2 x 6, 3 x 4, 1 x 4 x 3, 2 x 3 x 2: step s trains on
    samples s*12 .. s*12+11 of the epoch's permutation every time; no sample twice, none skipped."""
    n, seed = 48, 3
    order = SeededOrderSampler(n, seed).order(epoch)
    want = [sorted(order[s * 12:(s + 1) * 12]) for s in range(n // 12)]
    for world, per_device, accum in [(1, 12, 1), (1, 6, 2), (2, 6, 1), (3, 4, 1), (1, 4, 3), (2, 3, 2)]:
        assert step_samples(n, seed, epoch, world, per_device, accum) == want, (world, per_device, accum)


def test_resume_plan_same_shape_needs_nothing():
    shape = RunShape(2, 6, 1, True, 2)
    assert resume_plan(shape, shape, "ck") == (False, [])
    assert resume_plan(None, shape, "ck") == (False, [])  # a checkpoint from before run_shape.json


def test_resume_plan_refuses_another_global_batch_and_names_the_fix():
    with pytest.raises(ValueError) as err:
        resume_plan(RunShape(2, 6, 1), RunShape(1, 6, 1), "out/checkpoint-3")
    msg = str(err.value)
    assert "out/checkpoint-3" in msg and "global batch 12" in msg and "global batch 6" in msg
    assert "--per_device_train_batch_size 12" in msg
    with pytest.raises(ValueError, match="multiplies to 12 over 5 rank"):
        resume_plan(RunShape(2, 6, 1), RunShape(5, 2, 1), "ck")


def test_resume_plan_on_another_world_size_says_what_carries_over():
    cross, notes = resume_plan(RunShape(2, 6, 1, True, None), RunShape(1, 6, 2, True, None), "ck")
    assert cross and len(notes) == 1 and "optimizer moments" in notes[0]
    _, notes = resume_plan(RunShape(2, 6, 1, True, None), RunShape(1, 6, 2, True, None), "ck", gathered_negatives=True)
    assert "12 pairs" not in notes[-1] and "6 pairs per term instead of 12" in notes[-1]
    cross, notes = resume_plan(RunShape(2, 6, 1, False, 2), RunShape(1, 12, 1, True, 3), "ck")
    assert cross and any("data order of the resumed epoch differs" in n for n in notes)
    assert any("per-device batch changes from 6 to 12" in n for n in notes)
    cross, _ = resume_plan(RunShape(2, 6, 1, True, 2), RunShape(2, 6, 1, True, None), "ck")
    assert cross  # ZeRO-2 -> no DeepSpeed: the engine's files do not fit, the named state does


def test_shape_file_round_trip(tmp_path):
    shape = RunShape(3, 4, 2, True, 3)
    elastic.write_shape(str(tmp_path), shape)
    assert elastic.read_shape(str(tmp_path)) == shape
    assert shape.global_batch == 24 and "3 rank(s) x 4 per device x 2 accumulation" in shape.describe()
    assert elastic.read_shape(str(tmp_path / "none")) is None


def _model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.GELU(), torch.nn.Linear(4, 3)).double()
    model[0].bias.requires_grad_(False)  # a frozen parameter is not part of the state
    groups = [{"params": [model[0].weight, model[2].weight], "weight_decay": 0.1},
              {"params": [model[2].bias], "weight_decay": 0.0}]
    return model, torch.optim.AdamW(groups, lr=1e-2)


def _train(model, optimizer, batches):
    for x, y in batches:
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def test_named_state_restores_adam_exactly_into_a_fresh_optimizer():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g,
                dtype=torch.float64)) for _ in range(6)]
    ref, ref_opt = _model_and_optimizer(0)
    _train(ref, ref_opt, batches)

    run, opt = _model_and_optimizer(0)
    _train(run, opt, batches[:3])
    state = elastic.gather_named_state(run.named_parameters(), opt, step=3)
    assert sorted(state["params"]) == ["0.weight", "2.bias", "2.weight"] and state["step"] == 3
    resumed, fresh = _model_and_optimizer(1)  # other weights, empty optimizer: all comes from the state
    assert elastic.restore_named_state(resumed.named_parameters(), fresh, state, "state") == 3
    resumed[0].bias.data.copy_(run[0].bias.data)  # the frozen weights come from the base model
    _train(resumed, fresh, batches[3:])
    for (name, a), b in zip(ref.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_named_state_refuses_other_parameters():
    model, opt = _model_and_optimizer(0)
    _train(model, opt, [(torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64))])
    state = elastic.gather_named_state(model.named_parameters(), opt, step=1)
    state["params"]["extra.weight"] = state["params"].pop("2.bias")
    other, other_opt = _model_and_optimizer(0)
    with pytest.raises(ValueError, match=r"missing \['2.bias'\], unexpected \['extra.weight'\]"):
        elastic.restore_named_state(other.named_parameters(), other_opt, state, "ck/elastic_optimizer.pt")


def test_trainer_refuses_a_checkpoint_without_named_state_on_another_split(tmp_path):
    """A stage-2 checkpoint (no elastic_optimizer.pt) resumed on another world size: refused, naming
    the split that wrote it; on its own split it resumes as before."""
    from types import SimpleNamespace

    from llava_contrastive.hosts.common import ContrastiveTrainerMixin

    elastic.write_shape(str(tmp_path), RunShape(2, 4, 1, False, 3))
    trainer = SimpleNamespace(_contrastive_model=None, contrastive_args=None, args=SimpleNamespace(should_log=True))
    plan = ContrastiveTrainerMixin._plan_elastic_resume
    trainer._run_shape = lambda: RunShape(1, 4, 2, False, 3)
    with pytest.raises(ValueError, match=r"no world-size-independent state .* 2 rank\(s\) x 4 per device"):
        plan(trainer, str(tmp_path))
    trainer._run_shape = lambda: RunShape(2, 4, 1, False, 3)
    assert plan(trainer, str(tmp_path)) is False
