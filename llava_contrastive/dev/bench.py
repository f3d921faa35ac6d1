"""Training-step benchmark of the contrastive plugin against upstream's NTP-only stage 1.

    python -m llava_contrastive.dev.bench [--shape tiny|small|both] [--rounds 30] [--warmup 2]
        [--steps_per_round 3] [--batch 8] [--variants a,b,c,d,e,f,g] [--memory] [--data]
        [--json out.json] [--markdown out.md] [--profile c,d] [--flops_only]

Variants (one training step = forward + backward + AdamW step on the trainable parameters
(projector, + contrastive head) + logit-scale clamp + zero_grad):

    a  upstream NTP-only (llava.model.language_model.llava_llama.LlavaLlamaForCausalLM)
    b  plugin, --contrastive_weight 0
    c  plugin, default contrastive settings (InfoNCE, text = input embeddings, image = projector)
    d  c + --contrastive_text_source llm --contrastive_prompt prompteol
    dc d + --contrastive_text_cache (a fresh directory per shape, filled by the warm-up steps)
    e  c + --contrastive_image_source llm
    f  c + --contrastive_loss siglip
    g  c + --contrastive_queue_size 256 (queue pre-filled)

Each shape is built once: the upstream model (a) and ONE contrastive model (b-g) are loaded from
the same saved directories and carry the same projector weights. Each contrastive variant runs
``init_contrastive`` once on that instance; its state (arguments, head, prompt ids) is stashed and
swapped back in when the variant's turn comes, so queues keep their contents. Variants are
interleaved: every round runs each variant for k steps in a freshly shuffled order, so slow drifts
of a shared machine hit all variants alike. A variant's ratio is median(variant) / median(a) within
each round; the table gives the median of the per-round ratios with a bootstrap 95% interval (rounds
resampled). A time target is "met" when the interval's upper end is at or below it, "missed" when
its lower end is above it, and "unresolved" when the interval contains it: the machine's noise then
decides, not the code. The load average is logged per round and recorded at start and end;
``--render JSON`` rewrites the tables of a saved run.

The vision tower runs in float32 for every variant (fp16 is emulated on CPU).

Counted cost (always; alone with --flops_only): per variant, after one warm-up step, the FLOPs of
one training step counted by torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions,
attention; counted by shape, so deterministic: identical on every run and machine) and, on CUDA,
the step's peak allocated memory (torch.cuda.max_memory_allocated); both as ratios to (a). On the
CPU there are no allocator statistics: the memory column says n/a, or shows --memory's RSS.

--memory starts one subprocess per variant (``--only V``, only the model that variant needs is
built) with glibc's mmap threshold fixed at 64 KiB (freed tensors go back to the OS at once, so
RSS follows live memory); after warm-up it resets the process's peak RSS (/proc/self/clear_refs
5) and reports VmHWM during measured steps (absolute) and its excess over the RSS before the step.

--data times upstream's LazySupervisedDataset + DataCollatorForSupervisedDataset through a torch
DataLoader for each worker count, in images/s, against the images/s the training step consumes.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence

import torch

VARIANTS: Dict[str, tuple] = {
    "a": ("upstream NTP-only", None),
    "b": ("plugin, contrastive_weight 0", {"contrastive_weight": 0.0}),
    "c": ("plugin default (InfoNCE, text input_embeds, image projector)", {}),
    "d": ("text from prompted LLM pass (llm, prompteol)",
          {"contrastive_text_source": "llm", "contrastive_prompt": "prompteol"}),
    # d with --contrastive_text_cache (a fresh directory per shape, filled by the warm-up step)
    "dc": ("d with --contrastive_text_cache (cache filled)",
           {"contrastive_text_source": "llm", "contrastive_prompt": "prompteol", "contrastive_text_cache": ""}),
    "e": ("image from LLM hidden states", {"contrastive_image_source": "llm"}),
    "f": ("SigLIP", {"contrastive_loss": "siglip"}),
    "g": ("text queue 256", {"contrastive_queue_size": 256}),
}
TARGETS = {"b": 1.01, "c": 1.03, "dc": 1.03}  # time ratio to (a): the interval's upper end
# counted FLOPs of one step, ratio to (a): (b) runs upstream's forward, so exactly 1
FLOP_TARGETS = {"b": 1.0, "c": 1.01, "dc": 1.01}

SHAPES = {
    # tiny: the embedded test assets
    "tiny": None,
    # small: random-init Llama 512 x 8 layers, vocab 1024 (the tiny tokenizer uses ids < 512): lm_head
    # = 2.0% of the LLM's matmul parameters, the share it has in Vicuna-7B (131M of 6.6B); vocab 32000
    # at hidden 512 would make it 39% and hide the contrastive overhead behind an oversized lm_head.
    # CLIP 224 px / patch 14 (256 image tokens), hidden 256, 4 layers
    "small": {
        "llm": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=8, vocab_size=1024, max_position_embeddings=2048),
        "vision": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                       image_size=224, patch_size=14, projection_dim=256),
        "image_px": 384,  # synthetic JPEGs (tiny images upscaled), resized to 224 by the CLIP processor
    },
}
MAX_LEN = 2048  # upstream stage-1 model_max_length (never reached by these captions)


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- assets
def _tiny():
    from llava_contrastive.dev.tiny import build_tiny_assets

    root = os.environ.get("LLAVA_CONTRASTIVE_TINY_DIR", str(Path(__file__).resolve().parents[2] / "playground" / "tiny"))
    return build_tiny_assets(root)


def shape_assets(shape: str, cache: Path, n_images: int) -> SimpleNamespace:
    """llm_dir, vision_dir, records json, image folder for a shape (small: built once, cached)."""
    tiny = _tiny()
    records = json.loads(tiny.pretrain_json.read_text())[:n_images]
    if shape == "tiny":
        path = cache / f"tiny_records_{n_images}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(records))
        return SimpleNamespace(llm_dir=tiny.llm_dir, vision_dir=tiny.vision_dir, records=path,
                               image_folder=tiny.image_folder, spec=None)
    spec = SHAPES[shape]
    root = cache / shape
    stamp = root / "STAMP.json"
    key = {"spec": spec, "n_images": n_images, "version": 2}
    if not (stamp.exists() and json.loads(stamp.read_text()) == key):
        log(f"building {shape} assets (random init) in {root}")
        shutil.rmtree(root, ignore_errors=True)
        _build_small(tiny, root, spec, records)
        stamp.write_text(json.dumps(key))
    return SimpleNamespace(llm_dir=root / "llm", vision_dir=root / "vision", records=root / "records.json",
                           image_folder=root / "images", spec=spec)


def _build_small(tiny, root: Path, spec: dict, records: list) -> None:
    from PIL import Image
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig,
                              LlamaForCausalLM)

    from llava_contrastive.dev.tiny_models import CLIP_MEAN, CLIP_STD

    torch.manual_seed(0)
    llm_dir, vision_dir, images = root / "llm", root / "vision", root / "images"
    cfg = LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, **spec["llm"])
    LlamaForCausalLM(cfg).save_pretrained(str(llm_dir))
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny.llm_dir / name, llm_dir / name)
    vcfg = CLIPVisionConfig(hidden_act="quick_gelu", **spec["vision"])
    CLIPVisionModel(vcfg).save_pretrained(str(vision_dir))
    px = spec["vision"]["image_size"]
    CLIPImageProcessor(size={"shortest_edge": px}, crop_size={"height": px, "width": px},
                       image_mean=CLIP_MEAN, image_std=CLIP_STD).save_pretrained(str(vision_dir))
    side = spec["image_px"]
    for r in records:
        out = images / r["image"]
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.open(tiny.image_folder / r["image"]).convert("RGB").resize((side, side), Image.BICUBIC).save(out, quality=90)
    (root / "records.json").write_text(json.dumps(records))


# ----------------------------------------------------------------------------- upstream pieces
def upstream_data(assets, max_len: int = MAX_LEN):
    """(tokenizer, dataset, collator) exactly as upstream's stage 1 builds them (plain template)."""
    import transformers
    from llava import conversation
    from llava.train import train as upstream_train

    conversation.default_conversation = conversation.conv_templates["plain"]
    tok = transformers.AutoTokenizer.from_pretrained(str(assets.llm_dir), use_fast=False,
                                                     model_max_length=max_len, padding_side="right")
    tok.pad_token = tok.unk_token
    processor = transformers.CLIPImageProcessor.from_pretrained(str(assets.vision_dir))
    data_args = SimpleNamespace(image_folder=str(assets.image_folder), image_processor=processor,
                                is_multimodal=True, mm_use_im_start_end=False, image_aspect_ratio="square")
    ds = upstream_train.LazySupervisedDataset(str(assets.records), tok, data_args)
    collate = upstream_train.DataCollatorForSupervisedDataset(tokenizer=tok)
    return tok, ds, collate


def build_model(cls, assets, max_len: int = MAX_LEN):
    torch.manual_seed(0)
    model = cls.from_pretrained(str(assets.llm_dir), torch_dtype=torch.float32)
    margs = SimpleNamespace(vision_tower=str(assets.vision_dir), mm_vision_select_layer=-2,
                            mm_vision_select_feature="patch", pretrain_mm_mlp_adapter=None,
                            mm_patch_merge_type="flat", mm_projector_type="mlp2x_gelu")
    model.get_model().initialize_vision_modules(model_args=margs)
    model.get_vision_tower().to(dtype=torch.float32)  # same for every variant (fp16 is emulated on CPU)
    model.config.use_cache = False  # as upstream train() does
    model.config.tokenizer_padding_side = "right"
    model.config.tokenizer_model_max_length = max_len
    model.requires_grad_(False)
    for p in model.get_model().mm_projector.parameters():
        p.requires_grad_(True)
    model.train()
    return model


class Runner:
    """One variant: the model to call, its optimizer, and (contrastive) its stashed state."""

    STATE = ("contrastive_args", "contrastive_head", "_prompt_ids", "_separator_ids")

    def __init__(self, name, model, tok, lr: float = 1e-3, text_cache_dir: Optional[Path] = None):
        from llava_contrastive.core.config import ContrastiveArguments

        self.name, self.model = name, model
        flags = VARIANTS[name][1]
        if flags is not None and "contrastive_text_cache" in flags:
            if text_cache_dir is None:
                raise ValueError(f"variant {name} needs a text cache directory")
            shutil.rmtree(text_cache_dir, ignore_errors=True)  # fresh: filled by this run's own steps
            flags = dict(flags, contrastive_text_cache=str(text_cache_dir))
        self.state = None
        params = list(model.get_model().mm_projector.parameters())
        if flags is not None:
            model.init_contrastive(ContrastiveArguments(**flags), tok)
            head = model.contrastive_head
            if head.queue is not None:  # steady state: a full queue
                g = torch.Generator().manual_seed(1)
                head.queue.enqueue(torch.randn(head.queue.size, head.queue.embeds.shape[1], generator=g),
                                   torch.randint(0, 2 ** 62, (head.queue.size,), generator=g))
            params += head.trainable_parameters()
            self.state = {k: getattr(model, k) for k in self.STATE}
            self.state["config"] = dict(model.config.contrastive)
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def activate(self) -> None:
        if self.state is not None:
            for k in self.STATE:
                setattr(self.model, k, self.state[k])
            self.model.config.contrastive = self.state["config"]

    def step(self, batch) -> float:
        self.activate()
        c0 = time.process_time()
        t0 = time.perf_counter()
        out = self.model(**batch)
        out.loss.backward()
        self.opt.step()
        if self.state is not None:
            self.model.contrastive_head.clamp_()
        self.opt.zero_grad(set_to_none=True)
        del out
        return time.perf_counter() - t0, time.process_time() - c0


def build_runners(names: List[str], assets, tok, text_cache_dir: Optional[Path] = None) -> Dict[str, Runner]:
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

    from llava_contrastive.hosts.llava.model import ContrastiveLlavaForCausalLM

    runners: Dict[str, Runner] = {}
    ours = build_model(ContrastiveLlavaForCausalLM, assets) if any(n != "a" for n in names) else None
    if "a" in names:
        theirs = build_model(LlavaLlamaForCausalLM, assets)
        if ours is not None:
            theirs.get_model().mm_projector.load_state_dict(ours.get_model().mm_projector.state_dict())
        runners["a"] = Runner("a", theirs, tok)
    for n in names:
        if n != "a":
            runners[n] = Runner(n, ours, tok, text_cache_dir=text_cache_dir)
    return runners


def make_batches(ds, collate, batch: int, count: int) -> list:
    n = len(ds)
    return [collate([ds[(i * batch + j) % n] for j in range(batch)]) for i in range(count)]


def batch_stats(batches, tok, runners) -> dict:
    from llava_contrastive.hosts.llava.compat import IGNORE_INDEX

    b = batches[0]
    caption = b["labels"].ne(IGNORE_INDEX).sum(1).float()
    stats = {"batch": int(b["input_ids"].shape[0]), "text_tokens_per_row": float(b["attention_mask"].sum(1).float().mean()),
             "caption_tokens_per_row": float(caption.mean()), "image_px": list(b["images"].shape[-2:])}
    model = next(iter(runners.values())).model
    with torch.no_grad():
        feats = model.encode_images(b["images"][:1].to(torch.float32))
    stats["image_tokens"] = int(feats.shape[1])
    stats["seq_len"] = stats["text_tokens_per_row"] - 1 + stats["image_tokens"]
    if "d" in runners:
        prefix, suffix, bos = runners["d"].state["_prompt_ids"]
        stats["prompt_tokens_per_row"] = len(prefix) + len(suffix) + (bos is not None) + stats["caption_tokens_per_row"]
    return stats


# ----------------------------------------------------------------------------- timing
def _q(xs, q):
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median_interval(values: Sequence[float], draws: int = 2000, seed: int = 0, level: float = 0.95) -> tuple:
    """Bootstrap (percentile) interval of the median of ``values`` (rounds resampled with replacement)."""
    import random

    rng = random.Random(seed)
    n = len(values)
    meds = sorted(statistics.median(rng.choices(values, k=n)) for _ in range(draws))
    tail = (1 - level) / 2
    return _q(meds, tail), _q(meds, 1 - tail)


def verdict(low: float, high: float, target: float) -> str:
    """``met`` when the whole interval lies at or below ``target``, ``missed`` when it lies above it,
    ``unresolved`` when it contains the target: the machine's noise then decides, not the code. (An
    interval wider than the target's margin, ``target - 1``, can only be decisive from far away.)"""
    if high <= target:
        return "met"
    if low > target:
        return "missed"
    return "unresolved"


def rerender(result: dict) -> dict:
    """The verdicts and intervals of a saved ``--json`` result recomputed from its per-round ratios
    (the measurements stay as they were)."""
    for s in result["shapes"].values():
        for v in (s.get("timing") or {}).values():
            for clock in ("cpu", "wall"):
                v[clock]["ratio_ci95"] = list(median_interval(v[clock]["per_round_ratio"]))
            if "target" in v:
                v["verdict"] = {clock: verdict(*v[clock]["ratio_ci95"], v["target"]) for clock in ("cpu", "wall")}
    return result


def _summary(per_round: List[List[float]], base_rounds: List[List[float]]) -> dict:
    med = [statistics.median(t) for t in per_round]
    ratios = [m / statistics.median(b) for m, b in zip(med, base_rounds)]
    low, high = median_interval(ratios)
    return {"median_ms": statistics.median([x for t in per_round for x in t]) * 1e3,
            "per_round_median_ms": [m * 1e3 for m in med],
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "ratio_q25": _q(ratios, 0.25), "ratio_q75": _q(ratios, 0.75), "per_round_ratio": ratios,
            "ratio_ci95": [low, high]}


def time_variants(runners: Dict[str, Runner], batches, rounds: int, warmup: int, k: int) -> dict:
    """Per variant: wall-clock and process-CPU step times; ratios per round against (a)."""
    names = list(runners)
    for w in range(warmup):
        for n in names:
            runners[n].step(batches[w % len(batches)])
    wall = {n: [[] for _ in range(rounds)] for n in names}
    cpu = {n: [[] for _ in range(rounds)] for n in names}
    shuffle = random.Random(0)
    for r in range(rounds):
        order = list(names)
        shuffle.shuffle(order)  # a new order each round: slow drifts and neighbour effects hit all alike
        for n in order:
            for i in range(k):
                w_s, c_s = runners[n].step(batches[(r * k + i) % len(batches)])
                wall[n][r].append(w_s)
                cpu[n][r].append(c_s)
        log(f"round {r + 1}/{rounds} (load {os.getloadavg()[0]:.1f}) wall/cpu ms: " + " ".join(
            f"{n}={statistics.median(wall[n][r]) * 1e3:.0f}/{statistics.median(cpu[n][r]) * 1e3:.0f}" for n in names))
    base = "a" if "a" in names else names[0]
    result = {}
    for n in names:
        result[n] = {"label": VARIANTS[n][0], "baseline": base, "wall": _summary(wall[n], wall[base]),
                     "cpu": _summary(cpu[n], cpu[base])}
        if n in TARGETS:
            result[n]["target"] = TARGETS[n]
            result[n]["verdict"] = {clock: verdict(*result[n][clock]["ratio_ci95"], TARGETS[n]) for clock in ("cpu", "wall")}
    return result


# ----------------------------------------------------------------------------- counted cost
def count_step_flops(runner: Runner, batch) -> int:
    """FLOPs of one training step (forward + backward + optimizer step + clamp + zero_grad) as
    torch.utils.flop_counter.FlopCounterMode counts them: matmuls, convolutions and attention, by
    shape only, so the count is deterministic; elementwise ops (activations, AdamW's update, the
    loss's softmax) are not counted by it, so this is the matmul work of the step."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        runner.step(batch)
    return int(counter.get_total_flops())


def peak_step_memory(runner: Runner, batch) -> Optional[float]:
    """Peak allocated MB during one step from the CUDA allocator, or None on a device without
    allocator statistics (the CPU: see --memory for the subprocess RSS measurement)."""
    device = next(runner.model.parameters()).device
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    runner.step(batch)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2 ** 20


def counted_cost(runners: Dict[str, Runner], batches) -> dict:
    """Per variant: counted FLOPs of one step (after one warm-up step, which creates the optimizer
    state and fills (dc)'s text cache) and allocator peak memory, with ratios to (a)."""
    out = {}
    for n, r in runners.items():
        r.step(batches[0])  # warm-up: optimizer state exists, (dc)'s cache holds this batch
        flops = count_step_flops(r, batches[0])
        out[n] = {"label": VARIANTS[n][0], "flops": flops, "peak_mb": peak_step_memory(r, batches[0])}
        log(f"counted {n}: {flops / 1e9:.4f} GFLOP/step")
    base = out.get("a")
    for n, v in out.items():
        v["flops_ratio"] = v["flops"] / base["flops"] if base else None
        v["peak_ratio"] = (v["peak_mb"] / base["peak_mb"]) if base and v["peak_mb"] and base["peak_mb"] else None
        if n in FLOP_TARGETS:
            v["flops_target"] = FLOP_TARGETS[n]
            v["flops_met"] = v["flops_ratio"] is not None and v["flops_ratio"] <= FLOP_TARGETS[n] + 1e-12
    return out


# ----------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def measure_memory_here(runner: Runner, batches, warmup: int, steps: int) -> dict:
    for w in range(max(warmup, 1)):  # optimizer state exists after the first step
        runner.step(batches[w % len(batches)])
    peaks, deltas = [], []
    for i in range(steps):
        gc.collect()
        before = _status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        runner.step(batches[i % len(batches)])
        peak = _status_kb("VmHWM")
        peaks.append(peak / 1024)
        deltas.append((peak - before) / 1024)
    return {"peak_rss_mb": max(peaks), "step_mb": max(deltas), "rss_before_mb": before / 1024,
            "peaks_mb": peaks, "deltas_mb": deltas}


def measure_memory(args, shape: str, names: List[str]) -> dict:
    out = {}
    for n in names:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            path = f.name
        cmd = [sys.executable, "-m", "llava_contrastive.dev.bench", "--shape", shape, "--only", n,
               "--batch", str(args.batch), "--warmup", "1", "--steps_per_round", str(max(args.memory_steps, 1)),
               "--json", path, "--cache", str(args.cache), "--threads", str(args.threads)]
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536",
                   MALLOC_TOP_PAD_="0")
        log(f"memory {shape}/{n}: subprocess")
        subprocess.run(cmd, check=True, env=env)
        out[n] = json.loads(Path(path).read_text())["memory"]
        os.unlink(path)
    if "a" in out:
        for n, m in out.items():
            m["peak_ratio"] = m["peak_rss_mb"] / out["a"]["peak_rss_mb"]
            m["step_ratio"] = m["step_mb"] / out["a"]["step_mb"] if out["a"]["step_mb"] > 0 else float("nan")
    return out


# ----------------------------------------------------------------------------- data path
def measure_data(ds, collate, batch: int, workers: List[int], n_batches: int) -> dict:
    from torch.utils.data import DataLoader

    out = {}
    for w in workers:
        loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=w, collate_fn=collate,
                            drop_last=True, persistent_workers=False, generator=torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        it = iter(loader)
        next(it)
        t1 = time.perf_counter()
        got = 0
        for _ in range(n_batches):
            try:
                next(it)
            except StopIteration:
                break
            got += 1
        t2 = time.perf_counter()
        del it
        out[str(w)] = {"workers": w, "first_batch_s": t1 - t0, "batches": got,
                       "images_per_s": got * batch / (t2 - t1) if got else float("nan")}
        log(f"data: {w} workers {out[str(w)]['images_per_s']:.1f} images/s")
    return out


# ----------------------------------------------------------------------------- profile
def profile_variant(runner: Runner, batches, top: int = 25) -> str:
    from torch.profiler import ProfilerActivity, profile, record_function

    model = runner.model
    head = getattr(model, "contrastive_head", None)
    targets = [(model, name) for name in ("prepare_inputs_labels_for_multimodal", "encode_images", "_pair_embeddings",
                                         "_text_embeddings", "_image_embeddings")]
    targets.append((head, "joint"))  # the contrastive loss and its statistics
    wrapped = []
    for obj, name in targets:
        if obj is not None and hasattr(obj, name):
            orig = getattr(obj, name)

            def wrap(*a, __orig=orig, __name=name, **kw):
                with record_function(f"bench::{__name}"):
                    return __orig(*a, **kw)
            setattr(obj, name, wrap)
            wrapped.append((obj, name))
    try:
        runner.step(batches[0])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with record_function("bench::step"):
                runner.step(batches[1 % len(batches)])
    finally:
        for obj, name in wrapped:
            delattr(obj, name)
    events = prof.key_averages()
    phases = [f"  {e.key:45s} {e.cpu_time_total / 1e3:9.1f} ms total CPU" for e in events if e.key.startswith("bench::")]
    return events.table(sort_by="cpu_time_total", row_limit=top) + "\nphases (bench:: wrappers):\n" + "\n".join(phases)


# ----------------------------------------------------------------------------- output
def machine_info() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "platform": platform.platform()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        keep = ("Model name", "CPU(s)", "Thread(s) per core", "L2 cache", "L3 cache", "Flags")
        for line in lscpu.splitlines():
            key = line.split(":")[0].strip()
            if key in keep:
                val = line.split(":", 1)[1].strip()
                if key == "Flags":
                    val = " ".join(x for x in val.split() if x.startswith(("avx512f", "avx512_bf16", "avx2", "fma", "amx")))
                info[key] = val
        info["loadavg_start"] = os.getloadavg()
    except Exception:  # pragma: no cover
        pass
    return info


def counted_markdown(counted: dict, memory: Optional[dict] = None) -> str:
    """Headline table: counted FLOPs per step and peak memory, as ratios to (a)."""
    lines = ["| variant | | GFLOP/step (counted) | FLOPs / (a) | FLOP target | peak memory MB | memory / (a) |",
             "|---|---|---:|---:|---|---:|---:|"]
    for n, v in counted.items():
        ratio = v.get("flops_ratio")
        tgt = ""
        if "flops_target" in v:
            tgt = ("= 1 exactly" if v["flops_target"] == 1.0 else f"<= {v['flops_target']:.2f}") + \
                (" met" if v["flops_met"] else " MISSED")
        if v.get("peak_mb") is not None:
            mem = f"{v['peak_mb']:.0f} (CUDA allocator)"
            mem_ratio = f"{v['peak_ratio']:.4f}" if v.get("peak_ratio") else ""
        elif memory and n in memory:
            mem = f"{memory[n]['peak_rss_mb']:.0f} (process peak RSS, --memory)"
            mem_ratio = f"{memory[n].get('peak_ratio', float('nan')):.4f} (RSS)"
        else:
            mem, mem_ratio = "n/a (CPU: no allocator statistics; --memory gives RSS)", "n/a"
        lines.append(f"| {n} | {v['label']} | {v['flops'] / 1e9:.4f} | "
                     + (f"{ratio:.6f}" if ratio is not None else "") + f" | {tgt} | {mem} | {mem_ratio} |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    lines = []
    m = result["machine"]
    lines.append(f"Machine: {m.get('Model name', '?')}, {m.get('cpus')} CPUs, torch {m['torch']} "
                 f"({m['threads']} threads), load average at start {tuple(round(x, 1) for x in m.get('loadavg_start', ()))}")
    lines.append(f"Command: `{result['command']}`")
    for shape, s in result["shapes"].items():
        st = s["batch_stats"]
        lines.append("")
        lines.append(f"### {shape}: batch {st['batch']}, {st['image_tokens']} image tokens + "
                     f"{st['text_tokens_per_row']:.0f} text tokens per row (caption {st['caption_tokens_per_row']:.0f}"
                     + (f", prompted text pass {st['prompt_tokens_per_row']:.0f}" if "prompt_tokens_per_row" in st else "")
                     + ")" + (f", {s['rounds']} rounds x {s['steps_per_round']} steps, warm-up {s['warmup']}"
                              if s.get("timing") else ", counted cost only (--flops_only)"))
        if s.get("counted"):
            lines.append("")
            lines.append(counted_markdown(s["counted"], s.get("memory")))
        if not s.get("timing"):
            continue
        lines.append("")
        lines.append("| variant | | CPU ms/step | CPU ratio to (a) [95% interval] | IQR | wall ms/step | wall ratio [95% interval] | "
                     "target (interval's upper end) | CPU verdict | wall verdict |")
        lines.append("|---|---|---:|---:|---:|---:|---:|---|---|---|")
        for n, v in s["timing"].items():
            c, w = v["cpu"], v["wall"]
            tgt, verdicts = "", {"cpu": "", "wall": ""}
            if "target" in v:
                tgt = f"<= {v['target']:.2f}"
                verdicts = {k: x.upper() if x == "missed" else x for k, x in v["verdict"].items()}
            lines.append(f"| {n} | {v['label']} | {c['median_ms']:.1f} | {c['ratio']:.3f} "
                         f"[{c['ratio_ci95'][0]:.3f}, {c['ratio_ci95'][1]:.3f}] | "
                         f"{c['ratio_q25']:.3f}-{c['ratio_q75']:.3f} | {w['median_ms']:.1f} | {w['ratio']:.3f} "
                         f"[{w['ratio_ci95'][0]:.3f}, {w['ratio_ci95'][1]:.3f}] | {tgt} | {verdicts['cpu']} | "
                         f"{verdicts['wall']} |")
        if s.get("memory"):
            lines.append("")
            lines.append("| variant | peak RSS MB (step) | / (a) | step MB above pre-step RSS | / (a) |")
            lines.append("|---|---:|---:|---:|---:|")
            for n, v in s["memory"].items():
                lines.append(f"| {n} | {v['peak_rss_mb']:.0f} | {v.get('peak_ratio', float('nan')):.3f} | "
                             f"{v['step_mb']:.0f} | {v.get('step_ratio', float('nan')):.3f} |")
        if s.get("data"):
            lines.append("")
            lines.append("| data loader workers | images/s (wall) | first batch s | training step consumes images/s, (a) / (c), per CPU-second |")
            lines.append("|---:|---:|---:|---|")
            need = s.get("consumed_images_per_s", {})
            for w, v in s["data"].items():
                lines.append(f"| {w} | {v['images_per_s']:.1f} | {v['first_batch_s']:.2f} | "
                             + " / ".join(f"{need[k]:.1f}" for k in ("a", "c") if k in need) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main
def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m llava_contrastive.dev.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=("tiny", "small", "both"), default="both")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps_per_round", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--variants", default="a,b,c,d,dc,e,f,g")
    p.add_argument("--memory", action="store_true", help="peak memory per variant (one subprocess each)")
    p.add_argument("--memory_steps", type=int, default=2)
    p.add_argument("--data", action="store_true", help="data-loader throughput")
    p.add_argument("--data_workers", default="0,2,4")
    p.add_argument("--data_batches", type=int, default=6)
    p.add_argument("--flops_only", action="store_true",
                   help="only the counted cost (FLOPs of one step with FlopCounterMode, allocator peak memory on "
                        "CUDA): deterministic and fast, no timing rounds")
    p.add_argument("--profile", default="", help="variants to profile (torch.profiler, one step each)")
    p.add_argument("--ranks", type=int, default=1, help="only 1 is implemented (see BENCHMARKS.md)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: with 2 threads on a shared 2-core machine OpenMP barriers stall)")
    p.add_argument("--json")
    p.add_argument("--markdown")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "llava_contrastive_bench"))
    p.add_argument("--render", metavar="JSON", help="no measurement: rewrite --markdown from a saved --json "
                   "(verdicts and intervals recomputed from its per-round ratios)")
    p.add_argument("--only", help=argparse.SUPPRESS)  # memory child: one variant
    return p.parse_args(argv)


def run(argv=None) -> dict:
    args = parse(argv)
    if args.render:
        result = rerender(json.loads(Path(args.render).read_text()))
        md = markdown(result)
        print(md, flush=True)
        if args.markdown:
            Path(args.markdown).write_text(md)
        return result
    if args.ranks != 1:
        raise SystemExit("--ranks > 1 (ZeRO-2 via torchrun) is not implemented; see BENCHMARKS.md")
    torch.set_num_threads(args.threads)
    args.cache = Path(args.cache)
    names = [n.strip() for n in (args.only or args.variants).split(",") if n.strip()]
    for n in names:
        if n not in VARIANTS:
            raise SystemExit(f"unknown variant {n!r}; choose from {','.join(VARIANTS)}")
    shapes = ["tiny", "small"] if args.shape == "both" else [args.shape]
    n_images = max(args.batch * 4, 64)

    if args.only:  # memory child
        assets = shape_assets(shapes[0], args.cache, n_images)
        tok, ds, collate = upstream_data(assets)
        runners = build_runners(names, assets, tok, text_cache_dir=args.cache / f"{shapes[0]}_text_cache_{names[0]}")
        batches = make_batches(ds, collate, args.batch, 2)
        mem = measure_memory_here(runners[names[0]], batches, args.warmup, args.steps_per_round)
        Path(args.json).write_text(json.dumps({"memory": mem}))
        return {"memory": mem}

    result = {"machine": machine_info(), "command": "python -m llava_contrastive.dev.bench " + " ".join(argv or sys.argv[1:]),
              "vision_tower_dtype": "float32", "shapes": {}}
    for shape in shapes:
        assets = shape_assets(shape, args.cache, n_images)
        tok, ds, collate = upstream_data(assets)
        runners = build_runners(names, assets, tok, text_cache_dir=args.cache / f"{shape}_text_cache")
        batches = make_batches(ds, collate, args.batch, 4)
        s = {"rounds": args.rounds, "warmup": args.warmup, "steps_per_round": args.steps_per_round,
             "batch_stats": batch_stats(batches, tok, runners)}
        if shape == "small":
            s["spec"] = SHAPES["small"]
        log(f"{shape}: {s['batch_stats']}")
        s["counted"] = counted_cost(runners, batches)
        if args.flops_only:
            if args.memory:
                s["memory"] = measure_memory(args, shape, names)
            result["shapes"][shape] = s
            continue
        s["timing"] = time_variants(runners, batches, args.rounds, args.warmup, args.steps_per_round)
        s["consumed_images_per_s"] = {n: args.batch / (v["cpu"]["median_ms"] / 1e3) for n, v in s["timing"].items()}
        for n in [x.strip() for x in args.profile.split(",") if x.strip()]:
            if n in runners:
                table = profile_variant(runners[n], batches)
                s.setdefault("profile", {})[n] = table
                print(f"== profile {shape}/{n} ==\n{table}", flush=True)
        del runners
        gc.collect()
        if args.data:
            workers = [int(w) for w in args.data_workers.split(",") if w.strip()]
            s["data"] = measure_data(ds, collate, args.batch, workers, args.data_batches)
        if args.memory:
            s["memory"] = measure_memory(args, shape, names)
        result["shapes"][shape] = s
    result["machine"]["loadavg_end"] = os.getloadavg()
    md = markdown(result)
    print(md, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    if args.markdown:
        Path(args.markdown).write_text(md)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
