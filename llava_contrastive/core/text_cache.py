"""Text-embedding cache (``--contrastive_text_cache DIR``): frozen prompted-LLM caption embeddings,
computed once per unique caption, stored on disk, memory-mapped during training.

The text side of ``--contrastive_text_source llm`` is frozen, so a caption's embedding is a fixed
function of (LLM weights, prompt, text layer, pooling, caption tokens). A cache directory holds rows
for ONE such function; its ``identity.json`` records it and a run with another identity is refused.
Within a directory a row is keyed by the caption key (``pooling.caption_keys`` of the caption token
ids under the caption mask: a 62-bit double polynomial hash; at 558K captions the chance of any
collision is ~3e-8).

Layout of DIR (little-endian, raw row-major binary, so ``torch.from_file`` maps it without reading):

    identity.json          model fingerprint, text layer, pooling, prompt template and its token ids,
                           row size and dtype (``cache_identity``)
    part-<writer>.rows     [n, dim] rows in the identity's dtype
    part-<writer>.keys     [n] int64 caption keys, row i <-> key i
    part-<writer>.lock     held (flock) by the process appending to this part

Each process appends to its own part (``r<rank>``; another name if a live process holds that one),
so N ranks never write the same file and no merge step is needed: readers take the union of all
parts. A row is written before its key, so a row counts only once its key is on disk; a tail torn by
a kill is cut when the part is next opened for writing (``resume`` = rerun: present keys are skipped).

Model identity (``model_fingerprint``): sha256 of the name, shape, dtype and ~4,096 evenly strided
values of every parameter of the text decoder except its multimodal parts (projector, vision tower),
plus the last value of each. Any fine-tune, another checkpoint, or another load dtype changes it;
it needs no file paths (works for both hosts and converted checkpoints) and costs one strided copy
per tensor. Parameters partitioned by ZeRO-3 are gathered one at a time for the sample through the
``gathered`` context the host passes (a collective: every rank opens the cache), so a cache built
without DeepSpeed serves a ZeRO-3 run of the same weights.

Pure torch (numpy only through ``Tensor.numpy`` for bytes); no transformers import.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
from typing import Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["CACHE_FORMAT", "IDENTITY_FILE", "TextCacheMismatch", "model_fingerprint", "cache_identity",
           "TextEmbeddingCache", "unique_captions", "fill_cache", "pad_captions"]

CACHE_FORMAT = 1
IDENTITY_FILE = "identity.json"
MULTIMODAL_NAMES = ("mm_projector", "vision_tower", "vision_resampler", "multi_modal_projector", "vision_model")
_SAMPLES = 4096
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TextCacheMismatch(ValueError):
    """The cache directory was built for another model / prompt / layer / pooling / dtype."""


def model_fingerprint(module: torch.nn.Module, skip: Sequence[str] = MULTIMODAL_NAMES,
                      gathered: Optional[Callable[[torch.Tensor], ContextManager]] = None) -> str:
    """sha256 of the text decoder's weights (see the module docstring), as hex. ``gathered(param)``: a
    context in which a partitioned parameter (DeepSpeed ZeRO-3) is whole; the host supplies it (every
    rank must call this then: it is a collective)."""
    h = hashlib.sha256()
    params = sorted((n, p) for n, p in module.named_parameters() if not any(s in n for s in skip))
    if not params:
        raise ValueError("model_fingerprint: the text decoder has no parameters")
    for name, p in params:
        partitioned = hasattr(p, "ds_id") and p.numel() == 0
        if partitioned and gathered is None:
            raise ValueError(f"--contrastive_text_cache: parameter {name} is partitioned (DeepSpeed ZeRO-3) and no "
                             "gathering was given to read it")
        with gathered(p) if partitioned else contextlib.nullcontext():
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // _SAMPLES)
            sample = torch.cat([flat[::step], flat[-1:]]).float().cpu().contiguous()
            shape = tuple(getattr(p, "ds_shape", p.shape))
        h.update(f"{name}|{shape}|{p.dtype}|".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def cache_identity(*, fingerprint: str, text_layer: int, pooling: str, template: str,
                   prompt_ids: Tuple[Sequence[int], Sequence[int], Optional[int]], dim: int,
                   dtype: torch.dtype) -> Dict[str, object]:
    """What defines the rows of one cache directory (compared field by field on open)."""
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPES:
        raise ValueError(f"--contrastive_text_cache stores float32, float16 or bfloat16 rows, not {name}")
    prefix, suffix, bos = prompt_ids
    return {"format": CACHE_FORMAT, "model_fingerprint": fingerprint, "contrastive_text_layer": int(text_layer),
            "text_pooling": pooling, "prompt_template": template,
            "prompt_token_ids": {"bos": bos, "prefix": list(map(int, prefix)), "suffix": list(map(int, suffix))},
            "dim": int(dim), "dtype": name}


_FIXES = {
    "model_fingerprint": "the LLM's weights (another checkpoint, a fine-tune, or another load dtype)",
    "contrastive_text_layer": "--contrastive_text_layer",
    "text_pooling": "--contrastive_text_pooling",
    "prompt_template": "--contrastive_prompt",
    "prompt_token_ids": "the tokenizer (the prompt's token ids)",
    "dim": "the LLM's hidden size",
    "dtype": "the LLM's dtype (--bf16 / --fp16 / float32)",
    "format": "the cache format version",
}


def _differences(saved: dict, now: dict) -> List[str]:
    return [f"{k}: cache has {saved.get(k)!r}, this run has {now.get(k)!r} ({_FIXES.get(k, k)})"
            for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]


class TextEmbeddingCache:
    """Rows keyed by int64 caption keys in a directory (see the module docstring).

    ``lookup(keys) -> (found [B] bool, rows [found.sum(), dim])``; ``append(keys, rows)`` writes to this
    process's part and makes the rows visible to later lookups at once."""

    def __init__(self, directory: str, identity: Dict[str, object], writer: str = "r0"):
        self.directory = os.path.abspath(directory)
        self.identity = dict(identity)
        self.dim = int(identity["dim"])
        self.dtype = _DTYPES[str(identity["dtype"])]
        self.row_bytes = self.dim * torch.empty(0, dtype=self.dtype).element_size()
        self.writer = writer
        self._lock_file = None
        self._rows_file = None
        self._keys_file = None
        os.makedirs(self.directory, exist_ok=True)
        self._check_identity()
        self._fresh: Dict[int, Tensor] = {}
        self.refresh()

    # ---- identity ---------------------------------------------------------------------------
    def _check_identity(self) -> None:
        path = os.path.join(self.directory, IDENTITY_FILE)
        if not os.path.isfile(path):
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(self.identity, f, indent=1, sort_keys=True)
            os.replace(tmp, path)  # concurrent ranks write the same content; one wins atomically
        with open(path) as f:
            saved = json.load(f)
        diff = _differences(saved, self.identity)
        if diff:
            raise TextCacheMismatch(
                f"--contrastive_text_cache {self.directory} was built for other text embeddings:\n  "
                + "\n  ".join(diff)
                + "\nFix: point --contrastive_text_cache at another (new or empty) directory for these settings, "
                  "or delete this one to rebuild it.")

    # ---- reading ----------------------------------------------------------------------------
    def _parts(self) -> List[str]:
        return sorted(p[: -len(".keys")] for p in glob.glob(os.path.join(self.directory, "part-*.keys")))

    def _complete_rows(self, base: str) -> int:
        n_keys = os.path.getsize(base + ".keys") // 8 if os.path.exists(base + ".keys") else 0
        n_rows = os.path.getsize(base + ".rows") // self.row_bytes if os.path.exists(base + ".rows") else 0
        return min(n_keys, n_rows)

    def refresh(self) -> None:
        """(Re)map every part: rows other processes appended since become visible."""
        keys, where, self._maps = [], [], []
        for base in self._parts():
            n = self._complete_rows(base)
            if n == 0:
                continue
            k = torch.from_file(base + ".keys", shared=False, size=n, dtype=torch.int64).clone()
            rows = torch.from_file(base + ".rows", shared=False, size=n * self.dim, dtype=self.dtype).view(n, self.dim)
            part = len(self._maps)
            self._maps.append(rows)
            keys.append(k)
            where.append(torch.stack([torch.full((n,), part, dtype=torch.long), torch.arange(n)], 1))
        if keys:
            all_keys = torch.cat(keys)
            order = torch.argsort(all_keys, stable=True)
            self._sorted = all_keys[order]
            self._where = torch.cat(where)[order]
        else:
            self._sorted = torch.zeros(0, dtype=torch.long)
            self._where = torch.zeros(0, 2, dtype=torch.long)
        self._fresh = {}

    def __len__(self) -> int:
        """Distinct keys currently visible."""
        return int(torch.unique(self._sorted).numel()) + sum(1 for k in self._fresh if not self._in_maps(k))

    def _in_maps(self, key: int) -> bool:
        i = int(torch.searchsorted(self._sorted, torch.tensor([key])))
        return i < self._sorted.numel() and int(self._sorted[i]) == key

    def keys(self) -> Tensor:
        """Every distinct key visible (sorted)."""
        extra = torch.tensor(list(self._fresh), dtype=torch.long)
        return torch.unique(torch.cat([self._sorted, extra]))

    def lookup(self, keys: Tensor) -> Tuple[Tensor, Tensor]:
        """(found [B] bool, rows [n_found, dim] on the CPU, in ``keys`` order over the found ones)."""
        k = keys.detach().to("cpu", torch.long).reshape(-1)
        found = torch.zeros(k.numel(), dtype=torch.bool)
        rows: List[Tensor] = []
        if self._sorted.numel():
            pos = torch.searchsorted(self._sorted, k).clamp(max=self._sorted.numel() - 1)
            hit = self._sorted[pos] == k
        else:
            pos, hit = torch.zeros_like(k), torch.zeros_like(found)
        for i in range(k.numel()):
            if bool(hit[i]):
                part, r = self._where[pos[i]].tolist()
                rows.append(self._maps[part][r])
                found[i] = True
            elif int(k[i]) in self._fresh:
                rows.append(self._fresh[int(k[i])])
                found[i] = True
        out = torch.stack(rows) if rows else torch.zeros(0, self.dim, dtype=self.dtype)
        return found, out

    # ---- writing ----------------------------------------------------------------------------
    def _open_writer(self) -> None:
        if self._rows_file is not None:
            return
        name = self.writer
        while True:
            base = os.path.join(self.directory, f"part-{name}")
            lock = open(base + ".lock", "a")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:  # another live process appends to this part
                lock.close()
                name = f"{self.writer}-p{os.getpid()}" if name == self.writer else name + "x"
        n = self._complete_rows(base)  # cut a tail torn by a kill (row written, key not yet)
        for ext, size in ((".rows", n * self.row_bytes), (".keys", n * 8)):
            with open(base + ext, "ab") as f:
                f.truncate(size)
        self._lock_file = lock
        self._rows_file = open(base + ".rows", "ab")
        self._keys_file = open(base + ".keys", "ab")

    def append(self, keys: Tensor, rows: Tensor) -> None:
        """Write rows [n, dim] under keys [n] (rows first, then keys, each flushed)."""
        k = keys.detach().to("cpu", torch.long).reshape(-1).contiguous()
        r = rows.detach().to("cpu", self.dtype).contiguous()
        if r.shape != (k.numel(), self.dim):
            raise ValueError(f"append: rows {tuple(r.shape)} do not match {k.numel()} keys x dim {self.dim}")
        if k.numel() == 0:
            return
        self._open_writer()
        self._rows_file.write(r.view(torch.uint8).numpy().tobytes())
        self._rows_file.flush()
        self._keys_file.write(k.numpy().tobytes())
        self._keys_file.flush()
        for i, key in enumerate(k.tolist()):
            self._fresh[key] = r[i].clone()

    def close(self) -> None:
        for f in (self._rows_file, self._keys_file):
            if f is not None:
                os.fsync(f.fileno())
                f.close()
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
        self._rows_file = self._keys_file = self._lock_file = None

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


# ---- precompute --------------------------------------------------------------------------------------
def pad_captions(captions: Sequence[Sequence[int]], pad_id: int = 0) -> Tuple[Tensor, Tensor]:
    """Right-padded ids [n, L] and caption mask [n, L] (True on the caption tokens)."""
    width = max((len(c) for c in captions), default=0)
    ids = torch.full((len(captions), max(width, 1)), pad_id, dtype=torch.long)
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    for i, c in enumerate(captions):
        ids[i, : len(c)] = torch.tensor(list(c), dtype=torch.long)
        mask[i, : len(c)] = True
    return ids, mask


def unique_captions(captions: Sequence[Sequence[int]],
                    key_fn: Callable[[Tensor, Tensor], Tensor], chunk: int = 4096) -> Dict[int, List[int]]:
    """{caption key: caption token ids} over the distinct non-empty captions (first occurrence kept)."""
    out: Dict[int, List[int]] = {}
    for start in range(0, len(captions), chunk):
        part = [list(c) for c in captions[start: start + chunk] if len(c)]
        if not part:
            continue
        ids, mask = pad_captions(part)
        for key, cap in zip(key_fn(ids, mask).tolist(), part):
            out.setdefault(int(key), cap)
    return out


def fill_cache(cache: TextEmbeddingCache, captions: Dict[int, List[int]],
               embed: Callable[[Tensor, Tensor], Tensor], *, batch_size: int = 64, rank: int = 0, world: int = 1,
               device: torch.device | str = "cpu", progress: Optional[Callable[[int], None]] = None) -> int:
    """Compute and append the rows of this rank's shard (every ``world``-th of the sorted keys,
    starting at ``rank``) that the cache lacks; batches are length-sorted to limit padding.
    Returns the number of rows computed. Resumable: rerun after an interruption."""
    present = set(cache.keys().tolist())
    mine = sorted(captions)[rank::world]
    todo = sorted((k for k in mine if k not in present), key=lambda k: (len(captions[k]), k))
    if progress is not None and len(mine) > len(todo):
        progress(len(mine) - len(todo))
    for start in range(0, len(todo), batch_size):
        batch = todo[start: start + batch_size]
        ids, mask = pad_captions([captions[k] for k in batch])
        with torch.no_grad():
            rows = embed(ids.to(device), mask.to(device))
        cache.append(torch.tensor(batch, dtype=torch.long), rows)
        if progress is not None:
            progress(len(batch))
    return len(todo)
