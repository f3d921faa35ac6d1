"""Pooling, caption keys, logit-scale modules and the text queue."""
from __future__ import annotations

import math

import pytest
import torch

from llava_contrastive.core import pooling
from llava_contrastive.core.losses import info_nce_loss
from llava_contrastive.core.pooling import caption_keys, caption_mask_from_labels, last_token, masked_mean, pool
from llava_contrastive.core.text_queue import TextQueue, info_nce_loss_with_queue, validate_queue_usage
from llava_contrastive.core.temperature import LogitScale

from tests.core.test_losses import naive_info_nce

# ---------------------------------------------------------------- pooling


def _mask():
    return torch.tensor(
        [
            [1, 1, 1, 0, 0],  # right padding
            [0, 0, 1, 1, 1],  # left padding
            [0, 1, 0, 1, 0],  # holes
            [0, 0, 0, 0, 0],  # empty
        ],
        dtype=torch.bool,
    )


def test_masked_mean_and_last_token():
    x = torch.randn(4, 5, 3, requires_grad=True)
    m = _mask()
    mean = masked_mean(x, m)
    last = last_token(x, m)
    for b in range(4):
        idx = [t for t in range(5) if m[b, t]]
        if idx:
            torch.testing.assert_close(mean[b], torch.stack([x[b, t] for t in idx]).mean(0))
            torch.testing.assert_close(last[b], x[b, idx[-1]])
        else:
            assert torch.count_nonzero(mean[b]) == 0 and torch.count_nonzero(last[b]) == 0
    (mean.sum() + last.sum()).backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(pool(x, m, "mean"), mean)
    torch.testing.assert_close(pool(x, m, "last"), last)
    with pytest.raises(ValueError):
        pool(x, m, "max")


def test_pooling_bf16_and_nan_padding():
    x = torch.randn(4, 5, 3).to(torch.bfloat16)
    x[3] = float("nan")  # fully padded row holding garbage
    m = _mask()
    assert masked_mean(x, m).dtype == torch.bfloat16
    assert torch.count_nonzero(last_token(x, m)[3]) == 0


def test_caption_mask_from_labels():
    labels = torch.tensor([[-100, 5, 6, -100], [1, -100, -100, 2]])
    assert caption_mask_from_labels(labels).tolist() == [[False, True, True, False], [True, False, False, True]]
    assert caption_mask_from_labels(labels, ignore_index=5)[0, 1].item() is False


def _py_key(tokens: list[int]) -> int:
    h1 = h2 = 0
    for t in tokens:
        h1 = (h1 * pooling._B1 + (t + 1)) % pooling._P1
        h2 = (h2 * pooling._B2 + (t + 1)) % pooling._P2
    return h1 * pooling._P2 + h2


def test_caption_keys():
    pad = 0
    ids = torch.tensor(
        [
            [11, 12, 13, pad, pad, pad],  # right padded
            [pad, pad, pad, 11, 12, 13],  # left padded, same tokens
            [pad, 11, 12, 13, pad, pad],  # offset
            [13, 12, 11, pad, pad, pad],  # other order
            [0, 11, 12, 13, pad, pad],  # leading token id 0
            [151_000, 2**40, 7, 3, 2, 1],  # large ids: no overflow
            [pad] * 6,  # empty
        ]
    )
    mask = torch.tensor(
        [
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 1, 1],
            [0, 1, 1, 1, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 1],
            [0, 0, 0, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    keys = caption_keys(ids, mask)
    assert keys.dtype == torch.int64 and keys.shape == (7,)
    assert keys[0] == keys[1] == keys[2]
    assert len(set(keys[[0, 3, 4, 5, 6]].tolist())) == 5
    assert (keys >= 0).all()
    expected = [_py_key([int(t) for t, v in zip(r, mr) if v]) for r, mr in zip(ids, mask)]
    assert keys.tolist() == expected
    assert torch.equal(keys, caption_keys(ids.clone(), mask.clone()))  # deterministic
    # random long captions: matches the Python reference
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32_000, (3, 300), generator=g)
    mask = torch.rand(3, 300, generator=g) > 0.3
    assert caption_keys(ids, mask).tolist() == [
        _py_key([int(t) for t, v in zip(r, mr) if v]) for r, mr in zip(ids, mask)
    ]


# ---------------------------------------------------------------- temperature


def test_logit_scale_defaults_and_clamp():
    ls = LogitScale()
    assert ls.log_scale.requires_grad
    assert ls().item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        ls.log_scale.fill_(10.0)  # pushed above the cap (e.g. by an optimizer step)
    out = ls()
    assert out.item() == pytest.approx(100.0, rel=1e-6)
    out.backward()
    assert ls.log_scale.grad.item() == 0.0  # clamped: no gradient above the cap
    ls.clamp_()
    assert ls.log_scale.item() == pytest.approx(math.log(100.0), rel=1e-7)
    assert ls.log_scale.requires_grad  # still a parameter
    ls_bf16 = LogitScale(max_scale=50.0).to(torch.bfloat16)
    with torch.no_grad():
        ls_bf16.log_scale.fill_(9.0)
    assert ls_bf16().float().item() <= 50.0 * 1.01


def test_logit_scale_fixed_and_custom():
    ls = LogitScale(init_temperature=0.05, max_scale=30.0, learnable=False)
    assert not ls.log_scale.requires_grad
    assert ls().item() == pytest.approx(20.0, rel=1e-6)
    assert not ls().requires_grad
    assert "log_scale" in ls.state_dict()
    assert LogitScale(init_temperature=0.001, max_scale=100.0)().item() == pytest.approx(100.0, rel=1e-6)


# ---------------------------------------------------------------- queue


def test_queue_fifo_wraparound_and_state_dict():
    q = TextQueue(4, 2)
    assert len(q) == 0 and q.negatives()[0].shape == (0, 2)
    e = lambda *a: torch.tensor([[float(v), 1.0] for v in a])  # noqa: E731
    q.enqueue(e(1, 2, 3), torch.tensor([1, 2, 3]))
    assert len(q) == 3 and int(q.ptr) == 3
    q.enqueue(e(4, 5, 6), torch.tensor([4, 5, 6]))  # overwrites the two oldest
    assert len(q) == 4 and int(q.ptr) == 2
    assert q.keys.tolist() == [5, 6, 3, 4]
    torch.testing.assert_close(q.embeds, torch.nn.functional.normalize(e(5, 6, 3, 4), dim=-1))
    q.enqueue(e(*range(10, 16)), torch.arange(10, 16))  # larger than the queue: newest 4 survive
    assert sorted(q.keys.tolist()) == [12, 13, 14, 15] and int(q.ptr) == 2
    q2 = TextQueue(4, 2)
    q2.load_state_dict(q.state_dict())
    for k in ("embeds", "keys", "ptr", "filled"):
        assert torch.equal(getattr(q2, k), getattr(q, k))
    q.enqueue(e(7))  # without keys
    assert q.keys[2].item() == torch.iinfo(torch.int64).min
    q.reset()
    assert len(q) == 0


@pytest.mark.parametrize("b,keys", [(1, True), (5, False), (5, True)])
def test_info_nce_with_queue_matches_naive(b, keys):
    g = torch.Generator().manual_seed(b)
    img = torch.randn(b, 8, generator=g, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(b, 8, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(6.0, dtype=torch.float64, requires_grad=True)
    k = torch.tensor([3, 1, 3, 4, 2])[:b] if keys else None
    q = TextQueue(6, 8, dtype=torch.float64)
    q.enqueue(torch.randn(4, 8, generator=g, dtype=torch.float64), torch.tensor([3, 9, 4, 8]))
    extra, extra_keys = q.negatives()
    loss = info_nce_loss_with_queue(img, txt, scale, q, duplicate_keys=k)
    grads = torch.autograd.grad(loss, (img, txt, scale))
    ref = naive_info_nce(img, txt, scale, k, extra, extra_keys)
    ref_grads = torch.autograd.grad(ref, (img, txt, scale))
    assert loss.item() > 0
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=1e-10)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, atol=1e-12, rtol=1e-10)
    # extra negatives only increase the image->text part
    assert loss.item() >= info_nce_loss(img, txt, scale, duplicate_keys=k).item()


def test_empty_queue_equals_info_nce():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    s = torch.tensor(9.0)
    torch.testing.assert_close(info_nce_loss_with_queue(img, txt, s, TextQueue(8, 4)), info_nce_loss(img, txt, s))


def test_validate_queue_usage():
    validate_queue_usage(text_requires_grad=False, has_text_head=False)
    with pytest.raises(ValueError, match="text head"):
        validate_queue_usage(text_requires_grad=False, has_text_head=True)
    with pytest.raises(ValueError, match="require grad"):
        validate_queue_usage(text_requires_grad=True, has_text_head=False)
