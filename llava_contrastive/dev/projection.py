"""What the contrastive term costs at the real recipe, from counted matmul FLOPs (issue 15).

    python -m llava_contrastive.dev.projection [--markdown OUT.md]

An analytic count of the matmul work of one stage-1 training step, term by term, in the units
``torch.utils.flop_counter.FlopCounterMode`` counts (2 FLOPs per multiply-add; a frozen layer's
backward computes its input gradient only; attention as full S x S products, as the counter counts
SDPA). ``tests/test_projection.py`` checks it against the counter on the benchmark's tiny shape, then
this module applies it to Vicuna-7B/13B + CLIP ViT-L/14-336 (576 image tokens, the LCS-558K recipe:
global batch 256 on 8 x A100, gradient checkpointing on) and prints each term, so the ratios can be
recomputed by hand. Elementwise work (norms, activations, softmax, AdamW) is left out, as by the
counter; it is well under 1% of a step at these sizes.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Dict, Optional, Sequence


@dataclass(frozen=True)
class Llm:
    name: str
    hidden: int
    intermediate: int
    layers: int
    kv_hidden: int
    vocab: int

    def decoder_matmul_params(self) -> int:
        """Weights multiplied per token in one pass through the decoder layers (q, k, v, o, MLP)."""
        return self.layers * (self.hidden * (2 * self.hidden + 2 * self.kv_hidden) + 3 * self.hidden * self.intermediate)


@dataclass(frozen=True)
class Vision:
    name: str
    hidden: int
    intermediate: int
    layers: int
    patch: int
    image: int

    @property
    def patches(self) -> int:
        return (self.image // self.patch) ** 2


@dataclass(frozen=True)
class Step:
    batch: int  # samples per rank and micro-batch
    text_tokens: int  # text tokens per sample after the image (padded length of the batch)
    prompt_tokens: int  # tokens of the prompted caption in the text-only pass (padded)
    projector_layers: int = 2  # mlp2x_gelu
    gradient_checkpointing: bool = False
    contrastive_batch: int = 0  # pairs the similarity matrix spans (gathered over ranks; 0: batch)


VICUNA_7B = Llm("Vicuna-7B", 4096, 11008, 32, 4096, 32000)
VICUNA_13B = Llm("Vicuna-13B", 5120, 13824, 40, 5120, 32000)
CLIP_L_336 = Vision("CLIP ViT-L/14-336", 1024, 4096, 24, 14, 336)


def vision_flops(v: Vision, images: int) -> int:
    """Frozen tower, forward only: patch embedding + every layer over patches + CLS."""
    tokens = v.patches + 1
    patch_embed = 2 * 3 * v.patch * v.patch * v.hidden * v.patches
    per_layer = 2 * tokens * (4 * v.hidden * v.hidden + 2 * v.hidden * v.intermediate) + 4 * tokens * tokens * v.hidden
    return images * (patch_embed + v.layers * per_layer)


def projector_flops(v: Vision, llm: Llm, images: int, layers: int) -> int:
    """Trainable MLP on each image's patch tokens: forward, and a backward with weight gradients
    everywhere and input gradients for every layer but the first (its input, the tower's output,
    needs none)."""
    tokens = images * v.patches
    first, rest = v.hidden * llm.hidden, (layers - 1) * llm.hidden * llm.hidden
    forward = 2 * tokens * (first + rest)
    backward = 2 * tokens * first + 2 * 2 * tokens * rest
    return forward + backward


def decoder_flops(llm: Llm, samples: int, tokens: int, attention: bool = True) -> int:
    """One forward of the decoder layers over ``tokens`` per sample (attention as full products;
    ``attention=False`` leaves them out, as FlopCounterMode does for the CPU's SDPA kernel)."""
    products = 4 * tokens * tokens * llm.hidden * llm.layers if attention else 0
    return samples * (2 * tokens * llm.decoder_matmul_params() + products)


def step_flops(llm: Llm, v: Vision, s: Step, attention: bool = True) -> Dict[str, int]:
    """The terms of one step of (a) upstream NTP-only, and what (c) and (d) add, per rank.
    ``attention=False``: without the LLM's attention products (FlopCounterMode does not count the
    CPU's SDPA kernel; it does count the CUDA ones)."""
    seq = v.patches + s.text_tokens
    forward = decoder_flops(llm, s.batch, seq, attention)
    attention_backward = 4 * s.batch * seq * seq * llm.hidden * llm.layers if attention else 0
    lm_head = 2 * s.batch * seq * llm.hidden * llm.vocab
    terms = {
        "vision tower (frozen, forward)": vision_flops(v, s.batch),
        "projector (forward + backward)": projector_flops(v, llm, s.batch, s.projector_layers),
        "LLM decoder forward": forward,
        # frozen weights: the backward of each matmul computes the input gradient only (one product),
        # and attention's backward is twice its forward (dQ, dK, dV and dP)
        "LLM decoder backward (input gradients)": forward + attention_backward,
        "LLM decoder recompute (gradient checkpointing)": forward if s.gradient_checkpointing else 0,
        "lm_head forward + backward": 2 * lm_head,
    }
    terms["(a) total"] = sum(terms.values())
    # (c): this rank's rows of the similarity matrix against the gathered batch, and its backward
    # (two products: image rows and, through the gather, the columns); pooling is elementwise
    terms["(c) adds: similarity logits + backward"] = 3 * 2 * s.batch * (s.contrastive_batch or s.batch) * llm.hidden
    # (d): a no-grad text-only pass of the decoder over the prompted caption (no lm_head)
    terms["(d) adds: prompted text pass (no grad)"] = decoder_flops(llm, s.batch, s.prompt_tokens, attention)
    return terms


def ratios(terms: Dict[str, int]) -> Dict[str, float]:
    a = terms["(a) total"]
    c = a + terms["(c) adds: similarity logits + backward"]
    d = c + terms["(d) adds: prompted text pass (no grad)"]
    return {"(c)/(a)": c / a, "(d)/(a)": d / a, "(d) cached/(a)": c / a}


def cache_size(llm: Llm, captions: int, bytes_per_value: int = 2) -> float:
    """Disk bytes of a text-embedding cache: one row of the hidden size per unique caption."""
    return float(captions * llm.hidden * bytes_per_value)


def precompute_seconds(llm: Llm, captions: int, prompt_tokens: int, flops_per_second: float) -> float:
    return decoder_flops(llm, captions, prompt_tokens) / flops_per_second


def _g(flops: int) -> str:
    """GFLOP, with the digits a small term needs."""
    return f"{flops / 1e9:,.0f}" if flops >= 1e10 else f"{flops / 1e9:.3g}"


def report(gpus: int = 8, global_batch: int = 256, text_tokens: int = 40, prompt_tokens: int = 48,
           captions: int = 558_128, a100_flops: float = 312e12, mfu: float = 0.4) -> str:
    """Markdown: the terms and ratios for Vicuna-7B/13B + CLIP ViT-L/14-336 at the stage-1 recipe."""
    per_rank = global_batch // gpus
    lines = [f"Per rank and step: batch {per_rank} (global {global_batch} on {gpus} GPUs), "
             f"{CLIP_L_336.patches} image tokens + {text_tokens} text tokens (padded), prompted caption "
             f"{prompt_tokens} tokens (PromptEOL template + caption, padded), mlp2x_gelu, gradient checkpointing on "
             "(upstream's stage-1 flag). GFLOP per rank and step:", "",
             "| term | Vicuna-7B | Vicuna-13B |", "|---|---:|---:|"]
    step = Step(per_rank, text_tokens, prompt_tokens, gradient_checkpointing=True, contrastive_batch=global_batch)
    cols = [step_flops(m, CLIP_L_336, step) for m in (VICUNA_7B, VICUNA_13B)]
    for key in cols[0]:
        lines.append(f"| {key} | {_g(cols[0][key])} | {_g(cols[1][key])} |")
    rs = [ratios(c) for c in cols]
    for key in rs[0]:
        lines.append(f"| **{key}** | {rs[0][key]:.4f} | {rs[1][key]:.4f} |")
    speed = a100_flops * mfu
    lines += ["", f"On {gpus} x A100 (bf16 peak {a100_flops / 1e12:.0f} TFLOP/s, at {mfu:.0%} of it), a compute-bound step "
              "takes (a) total / speed; the predicted time ratios equal the FLOP ratios above. The gathered "
              f"negatives add one all-gather of {global_batch} x hidden bf16 values per step "
              f"({global_batch * VICUNA_7B.hidden * 2 / 2 ** 20:.0f} MiB for 7B), microseconds on NVLink.", "",
              "| | Vicuna-7B | Vicuna-13B |", "|---|---:|---:|"]
    lines.append("| (a) step time, s | " + " | ".join(f"{c['(a) total'] / speed:.2f}" for c in cols) + " |")
    lines.append(f"| text cache on disk ({captions:,} captions, bf16) | "
                 + " | ".join(f"{cache_size(m, captions) / 1e9:.1f} GB" for m in (VICUNA_7B, VICUNA_13B)) + " |")
    lines.append("| cache precompute on one A100, min | " + " | ".join(
        f"{precompute_seconds(m, captions, prompt_tokens, speed) / 60:.0f}" for m in (VICUNA_7B, VICUNA_13B)) + " |")
    lines += ["", "Memory: (c) keeps one pooled embedding per sample and the B x B logits (kilobytes); (d)'s text pass "
              "runs without gradients, so it holds one layer's activations at a time, "
              f"{per_rank} x {prompt_tokens} tokens, next to the main pass's stored activations of "
              f"{per_rank} x {CLIP_L_336.patches + text_tokens} tokens: peak memory moves by well under 1%."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llava_contrastive.dev.projection", description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--global_batch", type=int, default=256)
    p.add_argument("--text_tokens", type=int, default=40)
    p.add_argument("--prompt_tokens", type=int, default=48)
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--markdown")
    a = p.parse_args(argv)
    text = report(a.gpus, a.global_batch, a.text_tokens, a.prompt_tokens, mfu=a.mfu)
    print(text)
    if a.markdown:
        with open(a.markdown, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
