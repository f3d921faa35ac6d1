"""Tiny tokenizer / LLM / vision tower for offline tests: trained briefly, deterministically.

- SentencePiece BPE (byte fallback, dummy prefix) saved as a slow ``LlamaTokenizer``.
- ``LlamaForCausalLM`` (hidden 64, 2 layers) pretrained as an LM on the caption language.
- ``CLIPVisionModel`` (64x64 images, 16x16 patches) pretrained to predict per-quadrant
  colour / shape / size from its patch features (penultimate and last layer).
"""
from __future__ import annotations

import io
import math
import os
import random
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

Log = Callable[[str], None]


def _noop(msg: str) -> None:
    pass


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Sequence[str], llm_dir: Path, vocab_size: int = 512, log: Log = _noop):
    """Train a SentencePiece BPE model and save it as a slow LlamaTokenizer into ``llm_dir``."""
    import sentencepiece as spm
    from transformers import AutoTokenizer, LlamaTokenizer

    llm_dir = Path(llm_dir)
    llm_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        split_digits=True,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        max_sentence_length=4096,
        minloglevel=2,
    )
    (llm_dir / "tokenizer.model").write_bytes(buf.getvalue())
    tok = LlamaTokenizer.from_pretrained(str(llm_dir), legacy=False)
    tok.pad_token = tok.unk_token
    tok.save_pretrained(str(llm_dir))
    # reload through the path upstream uses
    tok = AutoTokenizer.from_pretrained(str(llm_dir), use_fast=False)
    if not isinstance(tok, LlamaTokenizer):
        raise RuntimeError(f"AutoTokenizer returned {type(tok).__name__}, expected LlamaTokenizer")
    if len(tok) <= 100:
        raise RuntimeError(f"tokenizer reloaded with only {len(tok)} tokens")
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2), (
        tok.unk_token_id,
        tok.bos_token_id,
        tok.eos_token_id,
    )
    assert tok.pad_token == "<unk>"
    log(f"tokenizer: vocab {len(tok)} ({type(tok).__name__}, legacy={tok.legacy})")
    return tok


# ----------------------------------------------------------------------------- LLM


def llm_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        torch_dtype="float32",
    )


def _cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def pretrain_llm(
    tok,
    texts: Sequence[str],
    llm_dir: Path,
    seed: int,
    steps: int = 500,
    batch_size: int = 32,
    lr: float = 3e-3,
    log: Log = _noop,
) -> Dict[str, float]:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = llm_config(len(tok))
    model = LlamaForCausalLM(cfg)
    ids = [tok(t).input_ids[: cfg.max_position_embeddings] for t in texts]  # BOS + text (+ "\n" byte)
    order_rng = random.Random(f"tiny-lm-{seed}")
    order: List[int] = []
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    t0 = time.time()
    ema = None
    losses: List[float] = []
    for step in range(steps):
        if len(order) < batch_size:
            perm = list(range(len(ids)))
            order_rng.shuffle(perm)
            order += perm
        batch = [ids[i] for i in order[:batch_size]]
        del order[:batch_size]
        L = max(len(b) for b in batch)
        inp = torch.zeros(len(batch), L, dtype=torch.long)
        lab = torch.full((len(batch), L), -100, dtype=torch.long)
        att = torch.zeros(len(batch), L, dtype=torch.long)
        for r, b in enumerate(batch):
            inp[r, : len(b)] = torch.tensor(b)
            lab[r, : len(b)] = torch.tensor(b)
            att[r, : len(b)] = 1
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, steps, lr, warmup=max(1, steps // 20))
        out = model(input_ids=inp, attention_mask=att, labels=lab)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        v = out.loss.item()
        losses.append(v)
        ema = v if ema is None else 0.95 * ema + 0.05 * v
        if (step + 1) % max(1, steps // 5) == 0 or step == steps - 1:
            log(f"  llm step {step + 1}/{steps} loss {ema:.3f} ({time.time() - t0:.1f}s)")
    model.eval()
    model.save_pretrained(str(llm_dir), safe_serialization=True)
    # generation_config.json is written too; keep it (upstream from_pretrained reads it)
    final = float(np.mean(losses[-max(1, steps // 20):]))
    return {"lm_final_loss": round(final, 4), "lm_steps": steps, "lm_train_seconds": round(time.time() - t0, 1)}


# ----------------------------------------------------------------------------- vision tower


def vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        image_size=64,
        patch_size=16,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_channels=3,
        projection_dim=64,
        hidden_act="quick_gelu",
    )


def image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": 64},
        crop_size={"height": 64, "width": 64},
        do_resize=True,
        do_center_crop=True,
        do_normalize=True,
        do_rescale=True,
        do_convert_rgb=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        resample=3,
    )


def images_to_tensor(jpegs: Sequence[bytes]) -> torch.Tensor:
    """Decode JPEG bytes to normalised (N, 3, 64, 64) float tensor (same as CLIPImageProcessor at 64px)."""
    from PIL import Image

    arr = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in jpegs])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


# patch grid is 4x4; quadrant q (row, col) covers patches rows 2r..2r+1, cols 2c..2c+1
_QUAD_PATCHES = []
for _q, (_r, _c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
    _QUAD_PATCHES.append([(2 * _r + i) * 4 + (2 * _c + j) for i in range(2) for j in range(2)])


class _QuadrantHead(nn.Module):
    """Throw-away head: per quadrant, its 4 patch features -> colour / shape / size logits."""

    def __init__(self, dim: int, n_col: int, n_shape: int, n_size: int):
        super().__init__()
        self.register_buffer("idx", torch.tensor(_QUAD_PATCHES), persistent=False)  # (4, 4)
        self.norm = nn.LayerNorm(dim)
        self.col = nn.Linear(4 * dim, n_col)
        self.shape = nn.Linear(4 * dim, n_shape)
        self.size = nn.Linear(4 * dim, n_size)

    def forward(self, patches: torch.Tensor):  # patches (B, 16, D)
        B, _, D = patches.shape
        q = self.norm(patches)[:, self.idx.flatten()].view(B, 4, 4 * D)
        return self.col(q), self.shape(q), self.size(q)


def pretrain_vision(
    jpegs: Sequence[bytes],
    targets: Sequence[tuple],
    vision_dir: Path,
    seed: int,
    n_classes: tuple,
    steps: int = 600,
    batch_size: int = 64,
    lr: float = 2e-3,
    log: Log = _noop,
) -> Dict[str, float]:
    from transformers import CLIPVisionModel

    torch.manual_seed(seed)
    model = CLIPVisionModel(vision_config())
    heads = nn.ModuleList([_QuadrantHead(64, *n_classes) for _ in range(2)])  # penultimate, last
    x_all = images_to_tensor(jpegs)
    tcol = torch.tensor([t[0] for t in targets])
    tshp = torch.tensor([t[1] for t in targets])
    tsiz = torch.tensor([t[2] for t in targets])
    n = x_all.shape[0]
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    pos = 0
    t0 = time.time()
    model.train()
    ema_loss, ema_acc = None, None
    hist = []
    for step in range(steps):
        if pos + batch_size > n:
            perm = torch.randperm(n, generator=gen)
            pos = 0
        bi = perm[pos : pos + batch_size]
        pos += batch_size
        x = x_all[bi]
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, steps, lr, warmup=max(1, steps // 20))
        out = model(pixel_values=x, output_hidden_states=True)
        loss = 0.0
        accs = []
        for head, hs in zip(heads, (out.hidden_states[-2], out.hidden_states[-1])):
            lc, ls, lz = head(hs[:, 1:])
            loss = loss + F.cross_entropy(lc.flatten(0, 1), tcol[bi].flatten())
            loss = loss + F.cross_entropy(ls.flatten(0, 1), tshp[bi].flatten())
            loss = loss + F.cross_entropy(lz.flatten(0, 1), tsiz[bi].flatten())
            ok = (lc.argmax(-1) == tcol[bi]) & (ls.argmax(-1) == tshp[bi]) & (lz.argmax(-1) == tsiz[bi])
            accs.append(ok.float().mean().item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lv, av = loss.item() / 2, accs[0]
        hist.append((lv, av))
        ema_loss = lv if ema_loss is None else 0.95 * ema_loss + 0.05 * lv
        ema_acc = av if ema_acc is None else 0.95 * ema_acc + 0.05 * av
        if (step + 1) % max(1, steps // 5) == 0 or step == steps - 1:
            log(
                f"  vision step {step + 1}/{steps} loss {ema_loss:.3f} "
                f"quadrant acc (penultimate) {ema_acc:.3f} ({time.time() - t0:.1f}s)"
            )
    model.eval()
    model.save_pretrained(str(vision_dir), safe_serialization=True)
    image_processor().save_pretrained(str(vision_dir))
    k = max(1, steps // 20)
    return {
        "vision_final_loss": round(float(np.mean([h[0] for h in hist[-k:]])), 4),
        "vision_final_quadrant_acc": round(float(np.mean([h[1] for h in hist[-k:]])), 4),
        "vision_steps": steps,
        "vision_train_seconds": round(time.time() - t0, 1),
    }


def check_vision_fp16(vision_dir: Path, jpegs: Sequence[bytes]) -> Dict[str, float]:
    """Reload the tower as upstream does and run it in float16 on CPU; outputs must be finite."""
    from transformers import CLIPImageProcessor, CLIPVisionModel
    from PIL import Image

    proc = CLIPImageProcessor.from_pretrained(str(vision_dir))
    model = CLIPVisionModel.from_pretrained(str(vision_dir)).to(torch.float16).eval()
    imgs = [Image.open(io.BytesIO(b)).convert("RGB") for b in jpegs]
    px = proc.preprocess(imgs, return_tensors="pt")["pixel_values"]
    ref = images_to_tensor(jpegs)
    with torch.no_grad():
        out = model(px.to(torch.float16), output_hidden_states=True)
    feats = out.hidden_states[-2][:, 1:]
    if tuple(feats.shape) != (len(jpegs), 16, 64) or not torch.isfinite(feats).all():
        raise RuntimeError(f"fp16 vision forward failed: shape {tuple(feats.shape)}")
    return {"processor_max_abs_diff": round(float((px - ref).abs().max()), 4)}
