"""core/text_cache.py: the on-disk cache against a plain dict, torn tails, identities, resumable fills."""
from __future__ import annotations

import os

import pytest
import torch

from llava_contrastive.core.pooling import caption_keys
from llava_contrastive.core.text_cache import (TextCacheMismatch, TextEmbeddingCache, cache_identity, fill_cache,
                                               model_fingerprint, pad_captions, unique_captions)


def identity(dim=4, dtype=torch.float32, **kw):
    base = dict(fingerprint="f" * 64, text_layer=-1, pooling="last", template='A "{caption}" B',
                prompt_ids=([5, 6], [7], 1), dim=dim, dtype=dtype)
    base.update(kw)
    return cache_identity(**base)


def read_all(directory, ident) -> dict:
    """{key: row} as a fresh reader sees the directory."""
    cache = TextEmbeddingCache(directory, ident)
    keys = cache.keys()
    found, rows = cache.lookup(keys)
    assert bool(found.all())
    return {int(k): rows[i].clone() for i, k in enumerate(keys.tolist())}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_append_lookup_matches_a_dict_and_survives_reopen(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    ref = {}
    cache = TextEmbeddingCache(str(tmp_path), identity(dtype=dtype))
    for _ in range(3):
        keys = torch.randint(0, 2 ** 62, (5,), generator=g)
        rows = torch.randn(5, 4, generator=g).to(dtype)
        cache.append(keys, rows)
        ref.update({int(k): r for k, r in zip(keys.tolist(), rows)})
    query = torch.tensor(list(ref)[::2] + [12345] + list(ref)[1::2])
    for reader in (cache, TextEmbeddingCache(str(tmp_path), identity(dtype=dtype))):  # in-process, then from disk
        found, rows = reader.lookup(query)
        assert found.tolist() == [k != 12345 for k in query.tolist()]
        expect = torch.stack([ref[k] for k in query.tolist() if k != 12345])
        assert rows.dtype == dtype and torch.equal(rows, expect)  # bit-exact
    assert len(TextEmbeddingCache(str(tmp_path), identity(dtype=dtype))) == 15


def test_other_prompt_layer_pooling_model_refused_with_the_difference(tmp_path):
    TextEmbeddingCache(str(tmp_path), identity()).append(torch.tensor([1]), torch.ones(1, 4))
    cases = {"contrastive_text_layer": identity(text_layer=-2), "prompt_template": identity(template="{caption}"),
             "text_pooling": identity(pooling="mean"), "model_fingerprint": identity(fingerprint="0" * 64),
             "dtype": identity(dtype=torch.bfloat16)}
    for field, other in cases.items():
        with pytest.raises(TextCacheMismatch) as err:
            TextEmbeddingCache(str(tmp_path), other)
        msg = str(err.value)
        assert field in msg and "Fix:" in msg and str(tmp_path) in msg, msg


def test_torn_tail_is_ignored_then_cut(tmp_path):
    cache = TextEmbeddingCache(str(tmp_path), identity())
    cache.append(torch.tensor([10, 11]), torch.arange(8.).view(2, 4))
    cache.close()
    with open(tmp_path / "part-r0.rows", "ab") as f:  # a kill between a row and its key
        f.write(torch.ones(4).numpy().tobytes()[:10])
    reader = TextEmbeddingCache(str(tmp_path), identity())
    assert sorted(reader.keys().tolist()) == [10, 11]
    reader.append(torch.tensor([12]), torch.full((1, 4), 7.))  # opening for writing cuts the tail
    assert os.path.getsize(tmp_path / "part-r0.rows") == 3 * 16
    assert torch.equal(read_all(str(tmp_path), identity())[12], torch.full((4,), 7.))


def test_two_live_writers_use_separate_parts(tmp_path):
    a = TextEmbeddingCache(str(tmp_path), identity(), writer="r0")
    b = TextEmbeddingCache(str(tmp_path), identity(), writer="r0")
    a.append(torch.tensor([1]), torch.ones(1, 4))
    b.append(torch.tensor([2]), torch.zeros(1, 4))  # r0 is locked by a: b writes another part
    parts = sorted(p for p in os.listdir(tmp_path) if p.endswith(".keys"))
    assert len(parts) == 2
    assert set(read_all(str(tmp_path), identity())) == {1, 2}


def toy_embed(ids, mask):
    """A deterministic stand-in for the text pass: depends on every caption token."""
    w = torch.arange(1, ids.shape[1] + 1, dtype=torch.float32)
    x = (ids.float() * mask * w).sum(1, keepdim=True)
    return torch.cat([x, x.sin(), mask.sum(1, keepdim=True).float(), x.cos()], 1)


def test_fill_is_resumable_and_sharded(tmp_path):
    g = torch.Generator().manual_seed(1)
    captions = [torch.randint(2, 50, (int(n),), generator=g).tolist() for n in torch.randint(1, 9, (60,), generator=g)]
    captions += captions[:10]  # duplicates are computed once
    unique = unique_captions(captions, caption_keys)
    n = len({tuple(c) for c in captions})  # the distinct token sequences (a plain set)
    assert len(unique) == n and n > 50

    full = tmp_path / "full"
    assert fill_cache(TextEmbeddingCache(str(full), identity()), unique, toy_embed, batch_size=7) == n
    ref = read_all(str(full), identity())

    calls = {"n": 0}

    def dying(ids, mask):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # interrupted after 3 batches
        return toy_embed(ids, mask)

    part = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        fill_cache(TextEmbeddingCache(str(part), identity()), unique, dying, batch_size=7)
    assert len(TextEmbeddingCache(str(part), identity())) == 21
    assert fill_cache(TextEmbeddingCache(str(part), identity()), unique, toy_embed, batch_size=7) == n - 21
    got = read_all(str(part), identity())
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)

    shards = tmp_path / "sharded"  # 3 "ranks", each its own part, no merge
    done = [fill_cache(TextEmbeddingCache(str(shards), identity(), writer=f"r{r}"), unique, toy_embed,
                       batch_size=5, rank=r, world=3) for r in range(3)]
    assert sum(done) == n and max(done) - min(done) <= 1
    got = read_all(str(shards), identity())
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


def test_fingerprint_sees_weights_dtype_and_skips_multimodal_parts():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4))
    fp = model_fingerprint(m)
    assert fp == model_fingerprint(m)
    m.add_module("mm_projector", torch.nn.Linear(4, 4))  # trainable, not part of the text pass
    assert model_fingerprint(m) == fp
    with torch.no_grad():
        m[1].weight[3, 2] += 1e-3  # one sampled value of a small tensor
    assert model_fingerprint(m) != fp
    fp32 = model_fingerprint(m)
    assert model_fingerprint(m.to(torch.bfloat16)) != fp32  # Module.to converts in place


def test_pad_captions():
    ids, mask = pad_captions([[3, 4, 5], [6]])
    assert ids.tolist() == [[3, 4, 5], [6, 0, 0]] and mask.tolist() == [[True] * 3, [True, False, False]]
