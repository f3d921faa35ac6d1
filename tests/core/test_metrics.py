"""Metrics vs naive loop implementations."""
from __future__ import annotations

import math

import pytest
import torch

from llava_contrastive.core.metrics import (
    alignment_report,
    in_batch_accuracy,
    modality_gap,
    positive_negative_cosine,
    retrieval_recall,
)


def _cos_table(img, txt):
    """Python-loop cosine table (float64), [i][j] = cos(img_i, txt_j)."""
    ni = [v / v.norm() for v in img.double()]
    nt = [v / v.norm() for v in txt.double()]
    return [[float(torch.dot(a, b)) for b in nt] for a in ni]


def naive_recall(img, txt, ks, keys=None):
    n = img.shape[0]
    cos = _cos_table(img, txt)
    out = {}
    for name in ("i2t", "t2i"):
        ranks = []
        for q in range(n):
            sim = (lambda c: cos[q][c]) if name == "i2t" else (lambda c: cos[c][q])
            r = 0
            for c in range(n):
                if c == q or (keys is not None and int(keys[c]) == int(keys[q])):
                    continue
                r += sim(c) > sim(q)
            ranks.append(r)
        for k in ks:
            out[f"{name}@{k}"] = sum(r < k for r in ranks) / n
    return out


def _data(n, d, seed, dup=True):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n, d, generator=g, dtype=torch.float64)
    txt = img + 1.2 * torch.randn(n, d, generator=g, dtype=torch.float64)
    if dup:  # exact ties: duplicated embeddings
        txt[3] = txt[1]
        txt[7] = txt[1] * 4.0  # same direction, other scale (power of 2: exact)
        img[5] = img[4]
    return img, txt


@pytest.mark.parametrize("chunk", [4096, 23, 7, 5, 1])
@pytest.mark.parametrize("with_keys", [False, True])
def test_recall_matches_naive(chunk, with_keys):
    img, txt = _data(23, 6, seed=chunk)
    keys = torch.arange(23)
    keys[[1, 3, 7]] = 100
    keys[[4, 5]] = 200
    keys = keys if with_keys else None
    ks = (1, 2, 5, 10)
    got = retrieval_recall(img, txt, ks, duplicate_keys=keys, chunk_size=chunk)
    assert got == naive_recall(img, txt, ks, keys)


def test_recall_float32_and_values():
    img, txt = _data(40, 16, seed=1)
    got = retrieval_recall(img.float(), txt.float(), chunk_size=9)
    assert got == naive_recall(img, txt, (1, 5, 10))
    assert set(got) == {"i2t@1", "i2t@5", "i2t@10", "t2i@1", "t2i@5", "t2i@10"}
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in got.values())


def test_ties_favour_true_pair():
    img = torch.eye(3, dtype=torch.float64)
    txt = torch.ones(3, 3, dtype=torch.float64)  # every text identical
    got = retrieval_recall(img, txt, ks=(1,))
    assert got["i2t@1"] == 1.0  # all candidates tie with the true pair
    assert got["t2i@1"] == 1.0  # texts: all images tie


def test_duplicate_key_is_not_a_miss():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.6, 0.8], [0.9, 0.1]])  # image 0 is closer to text 1
    plain = retrieval_recall(img, txt, ks=(1,))
    assert plain["i2t@1"] == 0.0
    masked = retrieval_recall(img, txt, ks=(1,), duplicate_keys=torch.tensor([5, 5]))
    assert masked["i2t@1"] == 1.0 and masked["t2i@1"] == 1.0


@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_positive_negative_cosine(chunk):
    img, txt = _data(11, 5, seed=4)
    cos = _cos_table(img, txt)
    n = 11
    pos = sum(cos[i][i] for i in range(n)) / n
    neg = sum(cos[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    got = positive_negative_cosine(img, txt, chunk_size=chunk)
    assert got["pos_mean"] == pytest.approx(pos, abs=1e-12)
    assert got["neg_mean"] == pytest.approx(neg, abs=1e-12)
    got32 = positive_negative_cosine(img.float(), txt.float(), chunk_size=chunk)
    assert got32["neg_mean"] == pytest.approx(neg, abs=1e-6)


def test_in_batch_accuracy():
    img, txt = _data(9, 4, seed=2, dup=False)
    cos = _cos_table(img, txt)
    n = 9
    i2t = sum(max(range(n), key=lambda j: cos[i][j]) == i for i in range(n)) / n
    t2i = sum(max(range(n), key=lambda j: cos[j][i]) == i for i in range(n)) / n
    assert in_batch_accuracy(img, txt) == {"i2t": i2t, "t2i": t2i}
    assert in_batch_accuracy(img, txt, chunk_size=2) == {"i2t": i2t, "t2i": t2i}


def test_modality_gap_hand_computed():
    img = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # normalised mean (1, 0)
    txt = torch.tensor([[0.0, 2.0], [0.0, 0.5]])  # normalised mean (0, 1)
    assert modality_gap(img, txt) == pytest.approx(math.sqrt(2.0))
    img = torch.tensor([[2.0, 0.0], [0.0, 5.0]])  # mean (0.5, 0.5)
    txt = torch.tensor([[1.0, 0.0], [4.0, 0.0]])  # mean (1, 0)
    assert modality_gap(img, txt) == pytest.approx(math.sqrt(0.5))
    assert modality_gap(img, img * 3) == 0.0


def test_alignment_report():
    img, txt = _data(12, 5, seed=9)
    keys = torch.arange(12)
    rep = alignment_report(img, txt, ks=(1, 3), duplicate_keys=keys)
    assert rep["n"] == 12
    assert rep["modality_gap"] == pytest.approx(modality_gap(img, txt))
    for k, v in retrieval_recall(img, txt, (1, 3)).items():
        assert rep[k] == v
    for k in ("pos_mean", "neg_mean", "acc_i2t", "acc_t2i"):
        assert k in rep


def test_bad_inputs():
    with pytest.raises(ValueError):
        retrieval_recall(torch.randn(3, 2), torch.randn(4, 2))
    with pytest.raises(ValueError):
        retrieval_recall(torch.randn(0, 2), torch.randn(0, 2))
