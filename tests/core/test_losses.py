"""info_nce_loss / siglip_loss vs naive float64 references written with loops."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from llava_contrastive.core.losses import info_nce_loss, siglip_loss


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.sqrt((v * v).sum())


def naive_info_nce(img, txt, scale, keys=None, extra=None, extra_keys=None):
    """Mean over rows of both CE directions, one pair at a time (float64)."""
    b = img.shape[0]
    if b == 0 or (b < 2 and extra is None):
        return (img.sum() + txt.sum() + scale) * 0
    ni = [_unit(img[i]) for i in range(b)]
    nt = [_unit(txt[i]) for i in range(b)]
    nq = [] if extra is None else [_unit(extra[k]) for k in range(extra.shape[0])]
    total = 0.0
    for i in range(b):
        for q, cands in ((ni[i], nt), (nt[i], ni)):
            logits = []
            for j in range(b):
                if j != i and keys is not None and int(keys[i]) == int(keys[j]):
                    continue
                logits.append(scale * torch.dot(q, cands[j]))
            if cands is nt:  # image -> text also sees the queue
                for k, e in enumerate(nq):
                    if keys is not None and extra_keys is not None and int(keys[i]) == int(extra_keys[k]):
                        continue
                    logits.append(scale * torch.dot(q, e))
            total = total + torch.logsumexp(torch.stack(logits), 0) - scale * torch.dot(q, cands[i])
    return total / (2 * b)


def naive_siglip(img, txt, scale, bias, keys=None):
    b = img.shape[0]
    if b < 2:
        return (img.sum() + txt.sum() + scale + bias) * 0
    total = 0.0
    for i in range(b):
        for j in range(b):
            if i != j and keys is not None and int(keys[i]) == int(keys[j]):
                continue
            z = 1.0 if i == j else -1.0
            logit = scale * torch.dot(_unit(img[i]), _unit(txt[j])) + bias
            total = total - F.logsigmoid(z * logit)
    return total / b


def _inputs(b, d, seed, dtype=torch.float32, keys=False):
    g = torch.Generator().manual_seed(seed)
    img = (torch.randn(b, d, generator=g) * 3).to(dtype)
    txt = (torch.randn(b, d, generator=g) * 0.2).to(dtype)
    k = torch.randint(0, 3, (b,), generator=g) if keys else None
    return img, txt, k


def _grads(fn, img, txt, params):
    img = img.detach().clone().requires_grad_(True)
    txt = txt.detach().clone().requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in params]
    loss = fn(img, txt, *params)
    loss.backward()
    return loss.detach(), [img.grad, txt.grad] + [p.grad for p in params]


CASES = list(itertools.product([1, 2, 5, 16], [3, 64], [False, True]))


def _close(got, ref, atol, rtol):
    loss_g, grads_g = got
    loss_r, grads_r = ref
    torch.testing.assert_close(loss_g.double(), loss_r, atol=atol, rtol=rtol)
    for a, b in zip(grads_g, grads_r):
        a = torch.zeros_like(b) if a is None else a
        torch.testing.assert_close(a.double(), b, atol=atol, rtol=rtol)


@pytest.mark.parametrize("b,d,keys", CASES)
def test_info_nce_matches_naive(b, d, keys):
    img, txt, k = _inputs(b, d, seed=b * 100 + d, keys=keys)
    scale = torch.tensor(8.0)
    got = _grads(lambda i, t, s: info_nce_loss(i, t, s, duplicate_keys=k), img, txt, [scale])
    ref = _grads(lambda i, t, s: naive_info_nce(i, t, s, k), img.double(), txt.double(), [scale.double()])
    _close(got, ref, atol=2e-6, rtol=1e-5)
    assert got[0].dtype == torch.float32


@pytest.mark.parametrize("b,d,keys", CASES)
def test_siglip_matches_naive(b, d, keys):
    img, txt, k = _inputs(b, d, seed=b * 10 + d + 1, keys=keys)
    scale, bias = torch.tensor(10.0), torch.tensor(-3.0)
    got = _grads(lambda i, t, s, c: siglip_loss(i, t, s, c, duplicate_keys=k), img, txt, [scale, bias])
    ref = _grads(
        lambda i, t, s, c: naive_siglip(i, t, s, c, k), img.double(), txt.double(), [scale.double(), bias.double()]
    )
    _close(got, ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("b,keys", [(2, False), (5, True), (16, False)])
def test_bf16_inputs(b, keys):
    img, txt, k = _inputs(b, 64, seed=7 + b, dtype=torch.bfloat16, keys=keys)
    scale, bias = torch.tensor(20.0), torch.tensor(-5.0)
    # reference on the bf16-rounded values upcast to float64
    got = _grads(lambda i, t, s: info_nce_loss(i, t, s, duplicate_keys=k), img, txt, [scale])
    ref = _grads(lambda i, t, s: naive_info_nce(i, t, s, k), img.double(), txt.double(), [scale.double()])
    assert got[0].dtype == torch.float32 and got[1][0].dtype == torch.bfloat16
    torch.testing.assert_close(got[0].double(), ref[0], atol=1e-5, rtol=1e-5)  # math is float32
    _close(got, ref, atol=2e-3, rtol=2e-2)  # bf16 gradients are rounded
    got = _grads(lambda i, t, s, c: siglip_loss(i, t, s, c, duplicate_keys=k), img, txt, [scale, bias])
    ref = _grads(lambda i, t, s, c: naive_siglip(i, t, s, c, k), img.double(), txt.double(), [scale.double(), bias.double()])
    torch.testing.assert_close(got[0].double(), ref[0], atol=1e-5, rtol=1e-5)
    _close(got, ref, atol=2e-3, rtol=2e-2)


def test_float64_stays_float64_and_scale_invariance():
    img, txt, _ = _inputs(6, 5, seed=3, dtype=torch.float64)
    s = torch.tensor(5.0, dtype=torch.float64)
    a = info_nce_loss(img, txt, s)
    assert a.dtype == torch.float64
    torch.testing.assert_close(a, info_nce_loss(img * 1e3, txt * 1e-3, s), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(a, naive_info_nce(img, txt, s), atol=1e-12, rtol=1e-12)
    assert siglip_loss(img, txt, s, torch.tensor(-1.0)).dtype == torch.float64
    # not distributed: gather has no effect
    torch.testing.assert_close(a, info_nce_loss(img, txt, s, gather=False))


def test_gradcheck_float64():
    img, txt, k = _inputs(4, 3, seed=11, dtype=torch.float64, keys=True)
    k = torch.tensor([0, 1, 0, 2])
    img.requires_grad_(True)
    txt.requires_grad_(True)
    s = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda i, t, s: info_nce_loss(i, t, s), (img, txt, s))
    assert torch.autograd.gradcheck(lambda i, t, s: info_nce_loss(i, t, s, duplicate_keys=k), (img, txt, s))
    assert torch.autograd.gradcheck(lambda i, t, s, c: siglip_loss(i, t, s, c), (img, txt, s, bias))
    assert torch.autograd.gradcheck(
        lambda i, t, s, c: siglip_loss(i, t, s, c, duplicate_keys=k), (img, txt, s, bias)
    )


@pytest.mark.parametrize("b", [0, 1])
def test_no_negatives_gives_connected_zero(b):
    img, txt, _ = _inputs(b, 4, seed=1)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    s = torch.tensor(3.0, requires_grad=True)
    c = torch.tensor(-1.0, requires_grad=True)
    for loss in (info_nce_loss(img, txt, s), siglip_loss(img, txt, s, c)):
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
    for t in (img, txt, s, c):
        assert t.grad is not None and torch.count_nonzero(t.grad) == 0


def test_all_duplicates_only_positive_left():
    img, txt, _ = _inputs(4, 8, seed=5)
    img.requires_grad_(True)
    keys = torch.full((4,), 9)
    loss = info_nce_loss(img, txt, torch.tensor(10.0), duplicate_keys=keys)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    assert torch.isfinite(img.grad).all()
    # SigLIP keeps only the positive pairs
    s, c = torch.tensor(10.0), torch.tensor(-2.0)
    pos = (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)
    expected = -F.logsigmoid(s * pos + c).sum() / 4
    torch.testing.assert_close(siglip_loss(img, txt, s, c, duplicate_keys=keys), expected)


def test_python_float_scale_accepted():
    img, txt, _ = _inputs(5, 4, seed=2)
    torch.testing.assert_close(info_nce_loss(img, txt, 7.0), info_nce_loss(img, txt, torch.tensor(7.0)))


def test_shape_errors():
    with pytest.raises(ValueError):
        info_nce_loss(torch.randn(3, 4), torch.randn(2, 4), torch.tensor(1.0))
    with pytest.raises(ValueError):
        siglip_loss(torch.randn(3, 4), torch.randn(3, 4), 1.0, 0.0, duplicate_keys=torch.zeros(2))
