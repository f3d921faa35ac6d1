"""Tiny tokenizer / LLM / vision tower for offline tests: trained briefly, deterministically.

- SentencePiece BPE (byte fallback, dummy prefix) saved as a slow ``LlamaTokenizer``.
- ``LlamaForCausalLM`` pretrained as an LM on the caption language (tier "tiny": hidden 64 x 2
  layers; "small": 256 x 4, see ``tiny.TIER_SHAPES``).
- ``CLIPVisionModel`` (64 px, patch 16; "tiny": hidden 64 x 3 layers, "small": 96 x 4)
  pretrained so that every patch token (penultimate and last layer) predicts the colour / shape /
  size of the object in its quadrant.
- ``quadrant_probe``: linear probes of what a saved tower's patch features carry (diagnostics, tests).
"""
from __future__ import annotations

import io
import json
import math
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


# Qwen2's pre-tokenizer split (its tokenizer.json): contractions, letter runs, single digits,
# punctuation runs with their newlines, newline runs, spaces
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen2's chat template (ChatML), without its default system prompt
CHATML_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
                   "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                   "{% endif %}")


def train_qwen2_tokenizer(texts: Sequence[str], llm_dir: Path, vocab_size: int = 512, log: Log = _noop):
    """A byte-level BPE tokenizer built as Qwen2's (its split regex, byte-level alphabet, no BOS,
    ``<|endoftext|>`` as end and padding, ChatML specials and chat template), trained on ``texts``
    and saved as ``Qwen2TokenizerFast`` into ``llm_dir``: the tiny Qwen2 tokenizes text the way a
    real one does (e.g. ".\n" can be one token), not with the Llama SentencePiece model."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    llm_dir = Path(llm_dir)
    llm_dir.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(QWEN2_SPECIAL), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(list(texts), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=list(QWEN2_SPECIAL[1:]))
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(str(llm_dir))
    config_path = llm_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(tokenizer_class="Qwen2Tokenizer", bos_token=None, add_bos_token=False, errors="replace")
    config_path.write_text(json.dumps(config, indent=2))
    tok = AutoTokenizer.from_pretrained(str(llm_dir))
    probe = "a large red circle in the top left corner.\n"
    if tok.decode(tok(probe).input_ids) != probe or tok.bos_token_id is not None:
        raise RuntimeError(f"{llm_dir}: the Qwen2 tokenizer does not round-trip {probe!r} "
                           f"({type(tok).__name__}: {tok.convert_ids_to_tokens(tok(probe).input_ids)})")
    log(f"tokenizer: vocab {len(tok)} ({type(tok).__name__}, byte-level BPE)")
    return tok


def transformers_major() -> int:
    """The installed transformers' major version (4: stack U, 5: stack M), without importing it."""
    from importlib.metadata import version

    return int(version("transformers").split(".")[0])


def write_fast_tokenizer(slow_dir: Path, out_dir: Path, slow, texts: Sequence[str]) -> None:
    """Write ``tokenizer.json`` (the fast form of the tiny SentencePiece tokenizer, legacy=False) into a
    family LLM's directory and check that ``AutoTokenizer`` there tokenizes ``texts`` as ``slow`` does.
    transformers 5 loads a Mistral directory through its fast backend, converting ``tokenizer.model``
    on the fly, which drops the leading "▁" of the first word: the LLM would see other ids at stage 1
    than it was pretrained on."""
    from transformers import AutoTokenizer

    if transformers_major() < 5:
        from transformers import LlamaTokenizerFast

        fast = LlamaTokenizerFast.from_pretrained(str(slow_dir), from_slow=True, legacy=False)
    else:  # its Llama tokenizer is the fast backend, converted as the slow one tokenizes
        fast = AutoTokenizer.from_pretrained(str(slow_dir))
    fast.backend_tokenizer.save(str(Path(out_dir) / "tokenizer.json"))
    loaded = AutoTokenizer.from_pretrained(str(out_dir))
    for special in (True, False):
        bad = [t for t in texts if loaded(t, add_special_tokens=special).input_ids
               != slow(t, add_special_tokens=special).input_ids]
        if bad:
            raise RuntimeError(f"{out_dir}: {type(loaded).__name__} tokenizes {len(bad)} of {len(texts)} texts "
                               f"differently from the SentencePiece model, e.g. {bad[0]!r}")


def _default_shape(part: str) -> Dict[str, int]:
    from llava_contrastive.dev.tiny import tier_shapes

    return tier_shapes("tiny")[part]


# ----------------------------------------------------------------------------- LLM


LLM_FAMILIES = ("llama", "mistral", "qwen2")


def llm_config(vocab_size: int, shape: Optional[Dict[str, int]] = None, family: str = "llama",
               special_ids: Optional[Dict[str, Optional[int]]] = None):
    """Config of a tiny LLM of ``family``: LlamaConfig; MistralConfig (grouped-query attention with
    half the key/value heads and a sliding window, as Mistral-7B); Qwen2Config (grouped-query
    attention, biases on the q/k/v projections, as Qwen2). ``shape`` (hidden/intermediate size,
    layers, heads) defaults to the tiny tier. ``special_ids``: bos/eos/pad ids of a tokenizer other than
    the tiny SentencePiece one (1/2/0)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    if family not in LLM_FAMILIES:
        raise ValueError(f"unknown LLM family {family!r}: choose one of {', '.join(LLM_FAMILIES)}")
    sh = dict(_default_shape("llm"), **(shape or {}))
    common = dict(
        vocab_size=vocab_size,
        hidden_size=sh["hidden_size"],
        intermediate_size=sh["intermediate_size"],
        num_hidden_layers=sh["num_hidden_layers"],
        num_attention_heads=sh["num_attention_heads"],
        max_position_embeddings=512,  # stage 2's v1 chat frame + 16 image tokens + 2-3 turns
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        torch_dtype="float32",
        **(special_ids or dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)),
    )
    if family == "mistral":
        return MistralConfig(**common, num_key_value_heads=max(1, sh["num_attention_heads"] // 2),
                             sliding_window=256)
    if family == "qwen2":
        return Qwen2Config(**common, num_key_value_heads=max(1, sh["num_attention_heads"] // 2),
                           use_sliding_window=False)
    return LlamaConfig(**common, num_key_value_heads=sh["num_attention_heads"])


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
    shape: Optional[Dict[str, int]] = None,
    heldout_texts: Sequence[str] = (),
    family: str = "llama",
) -> Dict[str, float]:
    """Pretrain a fresh causal LM of ``family`` and ``shape`` on ``texts``; save it to ``llm_dir``.

    Returns the final training loss and, with ``heldout_texts``, the mean token loss on them.
    """
    from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = llm_config(len(tok), shape, family, special_ids=dict(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    model = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM, "qwen2": Qwen2ForCausalLM}[family](cfg)
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
        inp, lab, att = _lm_batch([ids[i] for i in order[:batch_size]])
        del order[:batch_size]
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
    train_s = round(time.time() - t0, 1)
    model.save_pretrained(str(llm_dir), safe_serialization=True)
    # generation_config.json is written too; keep it (upstream from_pretrained reads it)
    final = float(np.mean(losses[-max(1, steps // 20):]))
    out = {"lm_final_loss": round(final, 4), "lm_steps": steps, "lm_train_seconds": train_s,
           "lm_params": sum(p.numel() for p in model.parameters())}
    if heldout_texts:
        hids = [tok(t).input_ids[: cfg.max_position_embeddings] for t in heldout_texts]
        out["lm_heldout_loss"] = round(lm_token_loss(model, hids), 4)
    return out


def _lm_batch(batch: Sequence[Sequence[int]]):
    """Right-padded (input_ids, labels with -100 on padding, attention_mask)."""
    L = max(len(b) for b in batch)
    inp = torch.zeros(len(batch), L, dtype=torch.long)
    lab = torch.full((len(batch), L), -100, dtype=torch.long)
    att = torch.zeros(len(batch), L, dtype=torch.long)
    for r, b in enumerate(batch):
        inp[r, : len(b)] = torch.tensor(b)
        lab[r, : len(b)] = torch.tensor(b)
        att[r, : len(b)] = 1
    return inp, lab, att


@torch.no_grad()
def lm_token_loss(model, ids: Sequence[Sequence[int]], batch_size: int = 64) -> float:
    """Mean next-token cross entropy over all predicted tokens of ``ids`` (token-weighted, not per text)."""
    total, count = 0.0, 0
    for i in range(0, len(ids), batch_size):
        inp, lab, att = _lm_batch(ids[i : i + batch_size])
        logits = model(input_ids=inp, attention_mask=att).logits[:, :-1]
        tgt = lab[:, 1:]
        total += float(F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-100, reduction="sum"))
        count += int((tgt != -100).sum())
    return total / max(1, count)


# ----------------------------------------------------------------------------- vision tower


VISION_TOWERS = ("clip", "siglip")
SIGLIP_MEAN = SIGLIP_STD = [0.5, 0.5, 0.5]


def _check_tower(tower: str) -> None:
    if tower not in VISION_TOWERS:
        raise ValueError(f"unknown vision tower {tower!r}: choose one of {', '.join(VISION_TOWERS)}")


def cls_tokens(tower: str) -> int:
    """Tokens before the patch tokens in the tower's hidden states: CLIP's class token; SigLIP has none."""
    _check_tower(tower)
    return 1 if tower == "clip" else 0


def vision_model_class(tower: str):
    _check_tower(tower)
    from transformers import CLIPVisionModel, SiglipVisionModel

    return CLIPVisionModel if tower == "clip" else SiglipVisionModel


def vision_config(shape: Optional[Dict[str, int]] = None, tower: str = "clip"):
    """Config of a tiny ``tower`` (CLIPVisionConfig / SiglipVisionConfig); ``shape`` (image/patch/hidden
    size, layers, heads) defaults to the tiny tier."""
    _check_tower(tower)
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    sh = dict(_default_shape("vision"), **(shape or {}))
    if (sh["image_size"] // sh["patch_size"]) % 2 or sh["image_size"] % sh["patch_size"]:
        raise ValueError(
            f"vision shape {sh}: image_size/patch_size must be an even integer (quadrants on patch borders)"
        )
    if tower == "siglip":
        return SiglipVisionConfig(image_size=sh["image_size"], patch_size=sh["patch_size"],
                                  hidden_size=sh["hidden_size"], intermediate_size=sh["intermediate_size"],
                                  num_hidden_layers=sh["num_hidden_layers"],
                                  num_attention_heads=sh["num_attention_heads"], num_channels=3)
    return CLIPVisionConfig(
        image_size=sh["image_size"],
        patch_size=sh["patch_size"],
        hidden_size=sh["hidden_size"],
        intermediate_size=sh["intermediate_size"],
        num_hidden_layers=sh["num_hidden_layers"],
        num_attention_heads=sh["num_attention_heads"],
        num_channels=3,
        projection_dim=sh["hidden_size"],
        hidden_act="quick_gelu",
    )


def image_processor(image_size: int = 64, tower: str = "clip"):
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    if tower == "siglip":  # SigLIP's own preprocessing: resize to a square, mean = std = 0.5
        return SiglipImageProcessor(size={"height": image_size, "width": image_size}, do_resize=True,
                                    do_rescale=True, do_normalize=True, image_mean=SIGLIP_MEAN,
                                    image_std=SIGLIP_STD, resample=3)
    return CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_resize=True,
        do_center_crop=True,
        do_normalize=True,
        do_rescale=True,
        do_convert_rgb=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        resample=3,
    )


def images_to_uint8(jpegs: Sequence[bytes], image_size: int = 64) -> torch.Tensor:
    """Decode JPEG bytes to (N, 3, S, S) uint8, resized (PIL bicubic) as CLIPImageProcessor does for square images."""
    from PIL import Image

    def load(b: bytes):
        im = Image.open(io.BytesIO(b)).convert("RGB")
        if im.size != (image_size, image_size):
            im = im.resize((image_size, image_size), resample=Image.BICUBIC)
        return np.asarray(im)

    return torch.from_numpy(np.stack([load(b) for b in jpegs])).permute(0, 3, 1, 2).contiguous()


def normalise_uint8(x: torch.Tensor, tower: str = "clip") -> torch.Tensor:
    """uint8 (N, 3, S, S) -> normalised float (rescale 1/255, the tower's mean/std), as its processor."""
    mean = torch.tensor(CLIP_MEAN if tower == "clip" else SIGLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD if tower == "clip" else SIGLIP_STD).view(1, 3, 1, 1)
    return (x.float().div_(255.0) - mean) / std


def images_to_tensor(jpegs: Sequence[bytes], image_size: int = 64) -> torch.Tensor:
    """Decode JPEG bytes to the normalised (N, 3, S, S) float tensor CLIPImageProcessor gives at ``image_size``."""
    return normalise_uint8(images_to_uint8(jpegs, image_size))


def patch_quadrants(grid: int) -> torch.Tensor:
    """(grid*grid,) long: the quadrant (``tiny_data.POSITIONS`` index) each patch lies in."""
    out = torch.empty(grid * grid, dtype=torch.long)
    for q, idx in enumerate(quadrant_patch_index(grid)):
        out[idx] = q
    return out


class _PatchHead(nn.Module):
    """Throw-away head: every patch token alone -> colour / shape / size (0 = empty) of its quadrant.

    Per token, not per quadrant: LLaVA's projector maps each patch token on its own, so the LLM can
    only bind "the circle" to "red" if one token carries both (issue 13: with a head over the 4
    patches of a quadrant concatenated, a single token decoded shape at 43%).
    """

    def __init__(self, dim: int, n_col: int, n_shape: int, n_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.col = nn.Linear(dim, n_col)
        self.shape = nn.Linear(dim, n_shape)
        self.size = nn.Linear(dim, n_size)

    def forward(self, patches: torch.Tensor):  # (B, P, D) -> 3 x (B, P, n)
        z = self.norm(patches)
        return self.col(z), self.shape(z), self.size(z)


def _patch_targets(targets: Sequence[tuple], quad: torch.Tensor) -> torch.Tensor:
    """(N, P, 3) long: per patch, its quadrant's (colour, shape, size) class (0 = empty quadrant)."""
    t = torch.tensor([list(zip(*tg)) for tg in targets])  # (N, 4, 3)
    return t[:, quad]


@torch.no_grad()
def _head_accuracy(
    model, head: _PatchHead, x_u8: torch.Tensor, tp: torch.Tensor, batch_size: int = 256, tower: str = "clip"
) -> Dict[str, float]:
    """Held-out per-token accuracy of the penultimate-layer head: colour/shape/size on occupied, presence on all."""
    preds = []
    cls = cls_tokens(tower)
    for i in range(0, x_u8.shape[0], batch_size):
        pixels = normalise_uint8(x_u8[i : i + batch_size], tower)
        hs = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        preds.append(torch.stack([lg.argmax(-1) for lg in head(hs[:, cls:])], -1))
    pr = torch.cat(preds)  # (N, P, 3)
    occ = tp[..., 0] > 0
    names = ("colour", "shape", "size")
    out = {n: round(float((pr[..., k][occ] == tp[..., k][occ]).float().mean()), 4) for k, n in enumerate(names)}
    out["presence"] = round(float(((pr[..., 0] > 0) == occ).float().mean()), 4)
    return out


def _patch_head_loss(model, heads, pixels: torch.Tensor, tp: torch.Tensor, cls: int = 1):
    """(summed cross-entropy of the penultimate and last layer heads, their per-token accuracies);
    ``cls``: tokens before the patches (CLIP's class token: 1; SigLIP: 0)."""
    out = model(pixel_values=pixels, output_hidden_states=True)
    loss = 0.0
    accs = []
    for head, hs in zip(heads, (out.hidden_states[-2], out.hidden_states[-1])):
        logits = head(hs[:, cls:])
        ok = torch.ones_like(tp[..., 0], dtype=torch.bool)
        for k, lg in enumerate(logits):
            loss = loss + F.cross_entropy(lg.flatten(0, 1), tp[..., k].flatten())
            ok &= lg.argmax(-1) == tp[..., k]
        accs.append(ok.float().mean().item())
    return loss, accs


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
    shape: Optional[Dict[str, int]] = None,
    heldout: Optional[tuple] = None,
    tower: str = "clip",
) -> Dict[str, float]:
    """Pretrain a fresh CLIPVisionModel (``tower="siglip"``: SiglipVisionModel, no class token) so every
    patch token of the penultimate and last layer
    predicts its quadrant's colour / shape / size (``tiny_data.vision_targets``); save it and its
    processor to ``vision_dir``. ``heldout`` = (jpegs, targets) of unseen scenes: the returned
    ``vision_heldout_*`` are the penultimate head's per-token accuracies on them."""
    torch.manual_seed(seed)
    cfg = vision_config(shape, tower)
    grid = cfg.image_size // cfg.patch_size
    model = vision_model_class(tower)(cfg)
    cls = cls_tokens(tower)
    heads = nn.ModuleList([_PatchHead(cfg.hidden_size, *n_classes) for _ in range(2)])  # penultimate, last
    quad = patch_quadrants(grid)
    x_all = images_to_uint8(jpegs, cfg.image_size)
    tp_all = _patch_targets(targets, quad)  # (N, P, 3)
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
        tp = tp_all[bi]
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, steps, lr, warmup=max(1, steps // 20))
        loss, accs = _patch_head_loss(model, heads, normalise_uint8(x_all[bi], tower), tp, cls)
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
                f"per-token acc (penultimate) {ema_acc:.3f} ({time.time() - t0:.1f}s)"
            )
    model.eval()
    train_s = round(time.time() - t0, 1)
    model.save_pretrained(str(vision_dir), safe_serialization=True)
    image_processor(cfg.image_size, tower).save_pretrained(str(vision_dir))
    k = max(1, steps // 20)
    res: Dict[str, float] = {
        "vision_final_loss": round(float(np.mean([h[0] for h in hist[-k:]])), 4),
        "vision_final_patch_acc": round(float(np.mean([h[1] for h in hist[-k:]])), 4),
        "vision_steps": steps,
        "vision_train_seconds": train_s,
        "vision_params": sum(p.numel() for p in model.parameters()),
    }
    if heldout is not None:
        hj, ht = heldout
        acc = _head_accuracy(model, heads[0], images_to_uint8(hj, cfg.image_size), _patch_targets(ht, quad),
                             tower=tower)
        res.update({f"vision_heldout_{k_}": v for k_, v in acc.items()})
    return res


def check_vision_fp16(vision_dir: Path, jpegs: Sequence[bytes]) -> Dict[str, float]:
    """Reload the tower as upstream does and run it in float16 on CPU; outputs must be finite."""
    from transformers import CLIPImageProcessor, CLIPVisionModel
    from PIL import Image

    proc = CLIPImageProcessor.from_pretrained(str(vision_dir))
    model = CLIPVisionModel.from_pretrained(str(vision_dir)).to(torch.float16).eval()
    c = model.config
    imgs = [Image.open(io.BytesIO(b)).convert("RGB") for b in jpegs]
    px = proc.preprocess(imgs, return_tensors="pt")["pixel_values"]
    ref = images_to_tensor(jpegs, c.image_size)
    with torch.no_grad():
        out = model(px.to(torch.float16), output_hidden_states=True)
    feats = out.hidden_states[-2][:, 1:]
    want = (len(jpegs), (c.image_size // c.patch_size) ** 2, c.hidden_size)
    if tuple(feats.shape) != want or not torch.isfinite(feats).all():
        raise RuntimeError(f"fp16 vision forward failed: shape {tuple(feats.shape)}, expected {want}, or non-finite")
    return {"processor_max_abs_diff": round(float((px - ref).abs().max()), 4)}


# ----------------------------------------------------------------------------- linear probe (diagnostics)


def quadrant_patch_index(grid: int) -> List[List[int]]:
    """Patch indices (row-major, CLS excluded) of each image quadrant for a ``grid`` x ``grid`` patch map.

    Quadrants in ``tiny_data.POSITIONS`` order: top left, top right, bottom left, bottom right.
    """
    if grid < 2 or grid % 2:
        raise ValueError(f"patch grid {grid} must be even so quadrants fall on patch borders (image_size/patch_size)")
    h = grid // 2
    corners = ((0, 0), (0, 1), (1, 0), (1, 1))
    return [[(r * h + i) * grid + (c * h + j) for i in range(h) for j in range(h)] for r, c in corners]


@torch.no_grad()
def tower_patch_features(vision_dir: Path, images: Sequence, layer: int = -2, batch_size: int = 256) -> torch.Tensor:
    """Patch features (N, P, D) of a saved tower as upstream LLaVA takes them: its saved
    CLIPImageProcessor, ``hidden_states[layer]`` (``mm_vision_select_layer``), CLS dropped ("patch")."""
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionModel

    proc = CLIPImageProcessor.from_pretrained(str(vision_dir))
    model = CLIPVisionModel.from_pretrained(str(vision_dir)).eval()
    out = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        imgs = [Image.open(io.BytesIO(b)).convert("RGB") if isinstance(b, bytes) else b for b in chunk]
        px = proc.preprocess(imgs, return_tensors="pt")["pixel_values"]
        out.append(model(pixel_values=px, output_hidden_states=True).hidden_states[layer][:, 1:].float())
    return torch.cat(out)


def fit_linear_probe(
    x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float = 1e-3, iters: int = 100
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Multinomial logistic regression (standardised inputs, L2, full-batch L-BFGS); returns a predictor."""
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w_, b_ = w.detach(), b.detach()
    return lambda xt: (((xt - mu) / sd) @ w_ + b_).argmax(-1)


def quadrant_probe(
    feats: torch.Tensor, targets: Sequence[tuple], n_fit: int, l2: float = 1e-3, per_patch: bool = False
) -> Dict[str, float]:
    """Linear-probe accuracy on held-out scenes of what a tower's patch features carry per quadrant.

    ``feats`` (N, P, D) patch features, ``targets`` per scene ``tiny_data.vision_targets`` (colour, shape,
    size lists, 0 = empty quadrant). The first ``n_fit`` scenes fit the probes, the rest score them.
    Input per quadrant: its patches' features concatenated; with ``per_patch`` each patch alone (one
    sample per patch, the quadrant's targets: what one image token tells the LLM). Colour / shape / size are scored on
    occupied quadrants only (chance 1/8, 1/6, 1/2); ``presence`` (occupied or not) on all quadrants.
    """
    n, p, d = feats.shape
    grid = int(round(math.sqrt(p)))
    idx = torch.tensor(quadrant_patch_index(grid))  # (4, k)
    t = torch.tensor([list(zip(*tg)) for tg in targets])  # (N, 4, 3): colour, shape, size per quadrant
    if per_patch:  # (N, 4*k, D): every patch a sample, with its quadrant's targets
        xq = feats[:, idx.flatten()]
        t = t.repeat_interleave(idx.shape[1], dim=1)
    else:
        xq = feats[:, idx.flatten()].reshape(n, 4, -1)  # (N, 4, k*D)
    fit, test = slice(0, n_fit), slice(n_fit, n)
    if n - n_fit < 20:
        raise ValueError(f"quadrant_probe: need held-out scenes beyond n_fit={n_fit} (got {n})")
    out: Dict[str, float] = {}
    xf, xt = xq[fit].reshape(-1, xq.shape[-1]), xq[test].reshape(-1, xq.shape[-1])
    tf, tt = t[fit].reshape(-1, 3), t[test].reshape(-1, 3)
    occ_f, occ_t = tf[:, 0] > 0, tt[:, 0] > 0
    for k, name in enumerate(("colour", "shape", "size")):
        yf, yt = tf[occ_f, k] - 1, tt[occ_t, k] - 1
        pred = fit_linear_probe(xf[occ_f], yf, int(t[..., k].max()), l2)(xt[occ_t])
        out[name] = round(float((pred == yt).float().mean()), 4)
    pred = fit_linear_probe(xf, occ_f.long(), 2, l2)(xt)
    out["presence"] = round(float((pred == occ_t.long()).float().mean()), 4)
    return out
