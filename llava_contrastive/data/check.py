"""Pre-flight check of a LLaVA training corpus: find the records that would crash or silently
spoil a run of many hours BEFORE step 1, the way upstream's ``LazySupervisedDataset`` would read them.

Pure: no ``llava`` import (PIL, json, tqdm, threads; a tokenizer may be passed in as an object).

    python -m llava_contrastive.data.check --data_path X.json --image_folder DIR [--mode full]
        [--model_name_or_path LLM --model_max_length 2048 --image_tokens 576]

Reasons (stable short codes, one per bad record, the first that applies in this order):
    malformed_record             not an object / no conversations / wrong roles / non-string values /
                                 "<image>" inside an answer (it would splice a second image) /
                                 instruct: "<image>" in several human turns for one image / an image
                                 name no file system accepts (NUL, unencodable characters) / text
                                 with a lone surrogate (JSON "\ud800"), which no tokenizer encodes
    duplicate_id                 a later record with an id already seen (the first one is kept)
    missing_image_token          pretrain: no "image" key, or no "<image>" in the first human turn;
                                 instruct: an "image" key but no "<image>" in any human turn
    empty_caption                pretrain: blank answer; instruct: every answer blank (a leading gpt
                                 turn, which upstream drops, does not count)
    caption_truncated_to_nothing no answer token survives model_max_length once BOS + the image's
                                 patch tokens (and, instruct, the prompt) have taken their positions
    path_escapes_folder          the image path leaves --image_folder ("../x.jpg", "/elsewhere/x.jpg")
    missing_image                no such file (or no --image_folder given)
    zero_size_image              empty file, or an image of width/height 0
    unreadable_image             PIL cannot identify/open it (also: not a regular file, no permission)
    truncated_image              full mode: decoding fails (e.g. "image file is truncated")

Non-RGB images (L, P, RGBA, LA, CMYK, I;16, ...) are valid: upstream converts them to RGB; they
are counted in ``CheckReport.mode_counts``. Image results are cached per file by
(path, size, mtime_ns, check mode), so re-checking an unchanged corpus is near instant.
"""
import argparse
import hashlib
import json
import os
import stat as stat_mod
import sys
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from llava_contrastive.core.files import atomic_write_json

MODES = ("off", "quick", "full")
POLICIES = ("error", "skip")
STAGES = ("pretrain", "instruct")
IMAGE_TOKEN = "<image>"
PLAIN_SEP = "\n"  # upstream conv_llava_plain.sep: appended to the caption
ROLES = ("human", "gpt")
CACHE_VERSION = 1

REASONS = (
    "malformed_record",
    "duplicate_id",
    "missing_image_token",
    "empty_caption",
    "caption_truncated_to_nothing",
    "path_escapes_folder",
    "missing_image",
    "zero_size_image",
    "unreadable_image",
    "truncated_image",
)

FIX_HINT = ("fix or remove these records, or pass --data_check_policy skip to exclude them "
            "(the skipped list is written to OUTPUT_DIR/skipped_records.json)")


class DataCheckError(ValueError):
    """Bad training records (before training, or a file that went bad during it).

    Constructible from the message alone (DataLoader workers re-raise exceptions as
    ``type(exc)(message)``); ``report`` / ``record`` are extras when known."""

    def __init__(self, message: str = "", report: "Optional[CheckReport]" = None,
                 record: "Optional[BadRecord]" = None):
        super().__init__(message)
        self.report = report
        self.record = record


@dataclass
class DataCheckArguments:
    data_check: str = field(default="quick", metadata={"help": (
        "check the training records and images before step 1: off | quick (open every image's header "
        "with PIL: missing/unreadable/empty files, records, paths; no decode) | full (also decode every "
        "image: catches truncated/corrupt files; slower). Results are cached per file.")})
    data_check_policy: str = field(default="error", metadata={"help": (
        "what to do with bad records: error (stop before training and list them) | skip (train on the "
        "good records only; the skipped ones go to OUTPUT_DIR/skipped_records.json, and a file that "
        "fails to load during training is replaced by the next good record)")})
    data_check_workers: int = field(default=8, metadata={"help": (
        "threads that open/decode images during the data check")})
    data_check_cache: Optional[str] = field(default=None, metadata={"help": (
        "cache file of per-image check results; default <data_path>.check-<hash of settings>.json "
        "next to the data file (or in ~/.cache/llava-contrastive if that folder is not writable)")})


class BadRecord(NamedTuple):
    index: int
    id: Any
    image: Any
    reason: str
    detail: str

    def as_dict(self) -> Dict[str, Any]:
        return {"index": self.index, "id": self.id, "image": self.image, "reason": self.reason,
                "detail": self.detail}


@dataclass
class CheckReport:
    good_indices: List[int]
    bad: List[BadRecord]
    counts_by_reason: Dict[str, int]
    mode_counts: Dict[str, int]
    n_records: int
    seconds: float
    mode: str = "quick"
    stage: str = "pretrain"
    image_folder: Optional[str] = None
    n_images: int = 0  # distinct image files looked at
    cache_hits: int = 0
    notes: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad

    @property
    def bad_ids(self) -> List[Any]:
        return [b.id for b in self.bad]

    def summary(self, max_items: int = 20) -> str:
        n_bad = len(self.bad)
        pct = 100.0 * n_bad / self.n_records if self.n_records else 0.0
        lines = [f"data check ({self.mode}, stage {self.stage}): {n_bad} of {self.n_records} records are bad "
                 f"({pct:.2f}%), {self.n_images} images checked in {self.seconds:.1f}s"
                 f"{f' ({self.cache_hits} cached)' if self.cache_hits else ''}"]
        if self.image_folder is not None:
            lines.append(f"  image folder: {self.image_folder}")
        if n_bad:
            lines.append("  by reason: " + ", ".join(f"{r} {c}" for r, c in _sorted_counts(self.counts_by_reason)))
            shown = self.bad[:max_items]
            lines.append(f"  first {len(shown)} bad records (index, id, image: reason - detail):")
            for b in shown:
                lines.append(f"    #{b.index} id={b.id!r} image={b.image!r}: {b.reason} - {b.detail}")
            if n_bad > len(shown):
                lines.append(f"    ... and {n_bad - len(shown)} more")
        if self.mode_counts:
            lines.append("  image modes of the good records: "
                         + ", ".join(f"{m} {c}" for m, c in _sorted_counts(self.mode_counts)))
        for note in self.notes:
            lines.append(f"  note: {note}")
        if n_bad:
            lines.append(f"  total: {n_bad} bad records. Fix: {FIX_HINT}.")
        return "\n".join(lines)

    def to_json(self, with_good_indices: bool = False) -> Dict[str, Any]:
        out = {"n_records": self.n_records, "n_good": len(self.good_indices), "n_bad": len(self.bad),
               "counts_by_reason": dict(self.counts_by_reason), "mode_counts": dict(self.mode_counts),
               "seconds": self.seconds, "mode": self.mode, "stage": self.stage,
               "image_folder": self.image_folder, "n_images": self.n_images, "cache_hits": self.cache_hits,
               "notes": list(self.notes), "bad": [b.as_dict() for b in self.bad]}
        if with_good_indices:
            out["good_indices"] = list(self.good_indices)
        return out

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "CheckReport":
        bad = [BadRecord(b["index"], b["id"], b["image"], b["reason"], b["detail"]) for b in d["bad"]]
        if "good_indices" in d:
            good = list(d["good_indices"])
        else:
            bad_set = {b.index for b in bad}
            good = [i for i in range(d["n_records"]) if i not in bad_set]
        return cls(good_indices=good, bad=bad, counts_by_reason=dict(d["counts_by_reason"]),
                   mode_counts=dict(d["mode_counts"]), n_records=d["n_records"], seconds=d["seconds"],
                   mode=d.get("mode", "quick"), stage=d.get("stage", "pretrain"),
                   image_folder=d.get("image_folder"), n_images=d.get("n_images", 0),
                   cache_hits=d.get("cache_hits", 0), notes=list(d.get("notes", [])))


def _sorted_counts(counts: Dict[str, int]) -> List[Tuple[str, int]]:
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def validate_settings(mode: str, policy: Optional[str] = None, stage: Optional[str] = None) -> None:
    if mode not in MODES:
        raise ValueError(f"--data_check {mode!r} is not one of {' | '.join(MODES)}")
    if policy is not None and policy not in POLICIES:
        raise ValueError(f"--data_check_policy {policy!r} is not one of {' | '.join(POLICIES)}")
    if stage is not None and stage not in STAGES:
        raise ValueError(f"stage {stage!r} is not one of {' | '.join(STAGES)}")


# ----------------------------------------------------------------------------- records


def _turns_problem(conv: Any, stage: str) -> Optional[str]:
    if not isinstance(conv, list) or not conv:
        return "'conversations' is missing, empty or not a list"
    for j, turn in enumerate(conv):
        if not isinstance(turn, dict):
            return f"turn {j} is a {type(turn).__name__}, not an object"
        if turn.get("from") not in ROLES:
            return f"turn {j}: 'from' is {turn.get('from')!r}, not one of {', '.join(ROLES)}"
        if not isinstance(turn.get("value"), str):
            return f"turn {j}: 'value' is a {type(turn.get('value')).__name__}, not a string"
        try:
            turn["value"].encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate (JSON "\ud800"): the tokenizer would raise
            return f"turn {j}: 'value' holds {turn['value'][e.start]!r} at position {e.start}, not valid unicode text"
    roles = [t["from"] for t in conv]
    if stage == "pretrain":
        if roles != ["human", "gpt"]:
            return f"the plain (stage-1) template needs exactly [human, gpt] turns, got {roles}"
    else:
        if roles[0] == "gpt":  # upstream drops a leading assistant turn
            roles = roles[1:]
        for j, r in enumerate(roles):
            if r != ROLES[j % 2]:
                return f"roles must alternate human/gpt, got {[t['from'] for t in conv]}"
    for j, turn in enumerate(conv):
        if turn["from"] == "gpt" and IMAGE_TOKEN in turn["value"]:
            return f"turn {j} (gpt) contains {IMAGE_TOKEN}: it would splice a second image into the sequence"
    return None


def _n_tokens(tokenizer: Any, text: str) -> int:
    ids = tokenizer(text).input_ids
    bos = getattr(tokenizer, "bos_token_id", None)
    if ids and bos is not None and ids[0] == bos:
        ids = ids[1:]
    return len(ids)


def _unusable_file_name(name: str) -> Optional[str]:
    """Why no file system can hold ``name`` (os.stat / open would raise ValueError), or None."""
    if "\x00" in name:
        return "contains a NUL character"
    try:
        os.fsencode(name)
    except UnicodeError as e:
        return f"cannot be encoded as a file name ({e.reason} at position {e.start})"
    return None


def record_problem(rec: Any, stage: str, seen_ids: Optional[set] = None, *, tokenizer: Any = None,
                   model_max_length: Optional[int] = None, image_tokens: int = 0,
                   truncated: Optional[List[int]] = None) -> Optional[Tuple[str, str]]:
    """(reason, detail) of the first record-level problem (no file access), or None."""
    if not isinstance(rec, dict):
        return "malformed_record", f"record is a {type(rec).__name__}, not an object"
    problem = _turns_problem(rec.get("conversations"), stage)
    if problem:
        return "malformed_record", problem
    has_image = "image" in rec
    if has_image and (not isinstance(rec["image"], str) or not rec["image"].strip()):
        return "malformed_record", f"'image' is {rec['image']!r}, not a file name"
    if has_image and _unusable_file_name(rec["image"]):
        return "malformed_record", f"'image' {rec['image']!r} {_unusable_file_name(rec['image'])}"
    if seen_ids is not None and rec.get("id") is not None:
        key = str(rec["id"])
        if key in seen_ids:
            return "duplicate_id", f"id {rec['id']!r} already used by an earlier record"
        seen_ids.add(key)
    conv = rec["conversations"]
    if stage == "pretrain":
        if not has_image:
            return "missing_image_token", "no 'image' key: every stage-1 record needs an image"
        if IMAGE_TOKEN not in conv[0]["value"]:
            return "missing_image_token", f"no {IMAGE_TOKEN} in the first human turn"
        caption = conv[1]["value"]
        if not caption.strip():
            return "empty_caption", "the gpt turn (caption) is blank"
        if model_max_length is not None:
            # upstream: input_ids = BOS, IMAGE, caption+sep; after splicing the image costs its
            # patch tokens and the sequence is cut at tokenizer_model_max_length
            overhead = 1 + max(1, image_tokens)
            budget = model_max_length - overhead
            if budget <= 0:
                return ("caption_truncated_to_nothing",
                        f"model_max_length {model_max_length} <= BOS + {max(1, image_tokens)} image tokens: "
                        "no caption token survives")
            if truncated is not None and tokenizer is not None and len((caption + PLAIN_SEP).encode()) + 2 > budget:
                n = _n_tokens(tokenizer, caption + PLAIN_SEP)
                if n > budget:
                    truncated.append(n - budget)
    else:
        with_token = [j for j, t in enumerate(conv) if t["from"] == "human" and IMAGE_TOKEN in t["value"]]
        if has_image and not with_token:
            return "missing_image_token", f"an 'image' but no {IMAGE_TOKEN} in any human turn"
        if has_image and len(with_token) > 1:  # upstream puts one image token in each such turn
            return "malformed_record", (f"{IMAGE_TOKEN} in {len(with_token)} human turns ({with_token}) for one "
                                        "image: keep it in the first human turn only")
        lead = 1 if conv[0]["from"] == "gpt" else 0  # upstream drops a leading assistant turn
        answers = [t["value"] for t in conv[lead:] if t["from"] == "gpt"]
        if not any(a.strip() for a in answers):
            return "empty_caption", "every gpt turn is blank (a leading gpt turn is dropped, not trained on)"
        if model_max_length is not None:
            start = 1 if conv[0]["from"] == "gpt" else 0
            first_gpt = next(j for j in range(start, len(conv)) if conv[j]["from"] == "gpt") \
                if any(t["from"] == "gpt" for t in conv[start:]) else None
            if first_gpt is not None:
                # lower bound of what precedes the first answer (the template adds more): BOS,
                # the image's tokens, the raw prompt text
                prompt = "\n".join(t["value"].replace(IMAGE_TOKEN, "") for t in conv[start:first_gpt])
                overhead = 1 + (max(1, image_tokens) if has_image else 0)
                if overhead >= model_max_length:
                    n_prompt = 0
                elif tokenizer is not None and len(prompt.encode()) + 2 + overhead >= model_max_length:
                    n_prompt = _n_tokens(tokenizer, prompt)
                else:
                    n_prompt = -1  # cannot reach the limit
                if n_prompt >= 0 and overhead + n_prompt >= model_max_length:
                    return ("caption_truncated_to_nothing",
                            f"BOS + {overhead - 1} image tokens + >= {n_prompt} prompt tokens >= "
                            f"model_max_length {model_max_length}: the first answer is cut off")
    return None


def image_path_problem(image: str, folder_abs: Optional[str]) -> Optional[Tuple[str, str]]:
    if folder_abs is None:
        return "missing_image", "no --image_folder given for a record with an image"
    path = os.path.normpath(os.path.join(folder_abs, image))
    if not (path == folder_abs or path.startswith(folder_abs.rstrip(os.sep) + os.sep)):
        return "path_escapes_folder", f"{image!r} resolves to {path}, outside {folder_abs}"
    return None


# ----------------------------------------------------------------------------- images


def _inspect_image(path: str, full: bool) -> Tuple[Optional[str], str, Optional[str]]:
    """(reason or None, detail, PIL mode or None) of an existing non-empty file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode, (w, h) = im.mode, im.size
            if w <= 0 or h <= 0:
                return "zero_size_image", f"{path}: image size {w}x{h}", mode
            if full:
                try:
                    im.load()
                except Exception as e:  # decode errors: OSError, SyntaxError, ValueError, EOFError, ...
                    return "truncated_image", f"{path}: {type(e).__name__}: {e}", mode
    except UnidentifiedImageError as e:
        return "unreadable_image", f"{path}: {e}", None
    except Exception as e:  # DecompressionBombError, OSError, SyntaxError from header parsing, ...
        return "unreadable_image", f"{path}: {type(e).__name__}: {e}", None
    return None, "", mode


def check_image_file(path: str, mode: str = "quick",
                     stat_result: Optional[os.stat_result] = None) -> Tuple[Optional[str], str, Optional[str]]:
    """(reason or None, detail, PIL mode or None) of one image file, as upstream would open it."""
    try:
        st = stat_result if stat_result is not None else os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return "missing_image", f"no such file: {path}", None
    except OSError as e:
        return "unreadable_image", f"{path}: {type(e).__name__}: {e}", None
    if not stat_mod.S_ISREG(st.st_mode):
        return "unreadable_image", f"{path}: not a regular file", None
    if st.st_size == 0:
        return "zero_size_image", f"{path}: empty file (0 bytes)", None
    return _inspect_image(path, full=(mode == "full"))


def classify_exception(exc: BaseException) -> Tuple[str, str]:
    """(reason, detail) of an exception raised while loading a sample during training."""
    from PIL import UnidentifiedImageError

    msg = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return "missing_image", msg
    if isinstance(exc, UnidentifiedImageError):
        return "unreadable_image", msg
    if isinstance(exc, OSError) and "truncated" in str(exc).lower():
        return "truncated_image", msg
    if isinstance(exc, (OSError, SyntaxError, EOFError)):
        return "unreadable_image", msg
    return "load_error", msg


def _bounded_map(fn: Callable, items: Sequence, workers: int) -> Iterator[Tuple[Any, Any]]:
    """(item, fn(item)) in completion order, with at most a few times `workers` items in flight."""
    if workers <= 1 or len(items) <= 1:
        for it in items:
            yield it, fn(it)
        return
    window = workers * 16
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="data-check") as pool:
        pending: deque = deque()
        it = iter(items)
        for item in it:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= window:
                break
        while pending:
            item, fut = pending.popleft()
            yield item, fut.result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(fn, nxt)))


# ----------------------------------------------------------------------------- cache


def default_cache_path(data_path: str, image_folder: Optional[str], mode: str, stage: str = "pretrain") -> str:
    """<data_path>.check-<hash>.json next to the data file, or in ~/.cache/llava-contrastive when
    that folder is not writable."""
    data_abs = os.path.abspath(data_path)
    key = json.dumps({"v": CACHE_VERSION, "data": data_abs,
                      "folder": os.path.abspath(image_folder) if image_folder else None, "mode": mode})
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    name = f"{os.path.basename(data_abs)}.check-{digest}.json"
    here = os.path.dirname(data_abs)
    if os.access(here, os.W_OK):
        return os.path.join(here, name)
    return os.path.join(os.path.expanduser("~"), ".cache", "llava-contrastive", name)


def _load_cache(path: Optional[str], folder_abs: Optional[str], mode: str) -> Dict[str, list]:
    if not path:
        return {}
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    if (not isinstance(data, dict) or data.get("version") != CACHE_VERSION or data.get("mode") != mode
            or data.get("image_folder") != folder_abs or not isinstance(data.get("entries"), dict)):
        return {}
    return data["entries"]


def write_json_atomic(path: str, obj: Any, indent: Optional[int] = None) -> None:
    atomic_write_json(path, obj, indent=indent)


# ----------------------------------------------------------------------------- the check


def _check_images(want: Dict[str, List[int]], folder_abs: str, mode: str, workers: int, cache_path: Optional[str],
                  progress: bool) -> Tuple[Dict[str, Tuple[Optional[str], str, Optional[str]]], int]:
    """(image -> (reason or None, detail, PIL mode), cache hits) for every distinct image path; files
    unchanged since the cached check (size, mtime) are not opened again."""
    entries = _load_cache(cache_path, folder_abs, mode)
    new_entries: Dict[str, list] = {}
    results: Dict[str, Tuple[Optional[str], str, Optional[str]]] = {}
    misses: List[Tuple[str, str, os.stat_result]] = []
    cache_hits = 0
    bar = _progress_bar(len(want), f"data check ({mode})", progress)
    try:
        for image in want:  # stat + cache lookup in this thread: cheap, threads would only slow it
            path = os.path.join(folder_abs, image)
            try:
                st = os.stat(path)
            except OSError:
                results[image] = check_image_file(path, mode)
                bar.update(1)
                continue
            cached = entries.get(image)
            if cached is not None and cached[0] == st.st_size and cached[1] == st.st_mtime_ns:
                results[image] = (cached[2], cached[3], cached[4])
                cache_hits += 1
                bar.update(1)
            else:
                misses.append((image, path, st))

        def one(miss: Tuple[str, str, os.stat_result]):
            return check_image_file(miss[1], mode, stat_result=miss[2])

        for (image, _, st), res in _bounded_map(one, misses, max(1, int(workers))):
            results[image] = res
            new_entries[image] = [st.st_size, st.st_mtime_ns, res[0], res[1], res[2]]
            bar.update(1)
    finally:
        bar.close()
    if cache_path and new_entries:
        try:
            write_json_atomic(cache_path, {"version": CACHE_VERSION, "mode": mode, "image_folder": folder_abs,
                                           "entries": {**entries, **new_entries}})
        except OSError as e:
            print(f"data check: could not write the cache {cache_path}: {e}", file=sys.stderr)
    return results, cache_hits


def check_records(records: list, image_folder: Optional[str], *, mode: str = "quick", tokenizer: Any = None,
                  model_max_length: Optional[int] = None, image_tokens: int = 0, stage: str = "pretrain",
                  workers: int = 8, cache_path: Optional[str] = None, progress: bool = True) -> CheckReport:
    """Check every record (structure, ids, image token, caption, path) and every distinct image
    file (mode quick: header; full: decode). mode "off" checks the records only (no file access).
    ``image_tokens``: patch tokens one image costs after splicing (e.g. 576 for CLIP-L/14 at 336px;
    ``model.get_vision_tower().num_patches``); 0 = unknown (the placeholder's 1 position is used).
    ``cache_path``: per-image results cache (None: no cache)."""
    validate_settings(mode, stage=stage)
    t0 = time.perf_counter()
    folder_abs = os.path.abspath(image_folder) if image_folder is not None else None
    bad: Dict[int, BadRecord] = {}
    seen_ids: set = set()
    truncated: List[int] = []
    want: Dict[str, List[int]] = {}  # image path (as in the record) -> record indices
    for i, rec in enumerate(records):
        problem = record_problem(rec, stage, seen_ids, tokenizer=tokenizer, model_max_length=model_max_length,
                                 image_tokens=image_tokens, truncated=truncated)
        if problem is None and isinstance(rec, dict) and "image" in rec:
            problem = image_path_problem(rec["image"], folder_abs)
            if problem is None and mode != "off":
                want.setdefault(rec["image"], []).append(i)
        if problem is not None:
            rid = rec.get("id") if isinstance(rec, dict) else None
            img = rec.get("image") if isinstance(rec, dict) else None
            bad[i] = BadRecord(i, rid, img, *problem)

    image_mode: Dict[str, Optional[str]] = {}
    results, cache_hits = _check_images(want, folder_abs, mode, workers, cache_path, progress) if want else ({}, 0)
    for image, (reason, detail, pil_mode) in results.items():
        image_mode[image] = pil_mode
        if reason is not None:
            for i in want[image]:
                bad[i] = BadRecord(i, records[i].get("id"), image, reason, detail)

    bad_list = [bad[i] for i in sorted(bad)]
    good = [i for i in range(len(records)) if i not in bad]
    mode_counts: Counter = Counter()
    for i in good:
        rec = records[i]
        if isinstance(rec, dict) and "image" in rec and image_mode.get(rec["image"]) is not None:
            mode_counts[image_mode[rec["image"]]] += 1
    notes = []
    if truncated:
        notes.append(f"{len(truncated)} captions are longer than the {model_max_length - 1 - max(1, image_tokens)} "
                     f"positions left after BOS + image tokens and will be cut (up to {max(truncated)} tokens)")
    if mode == "off":
        notes.append("image files were not checked (--data_check off)")
    return CheckReport(good_indices=good, bad=bad_list, counts_by_reason=dict(Counter(b.reason for b in bad_list)),
                       mode_counts=dict(mode_counts), n_records=len(records), seconds=time.perf_counter() - t0,
                       mode=mode, stage=stage, image_folder=folder_abs, n_images=len(want), cache_hits=cache_hits,
                       notes=notes)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="img", mininterval=2.0, file=sys.stderr, dynamic_ncols=True)


def load_records(data_path: str) -> list:
    with open(data_path, "r", encoding="utf-8") as f:
        records = json.load(f)
    if not isinstance(records, list):
        raise DataCheckError(f"{data_path}: expected a JSON list of records, got a {type(records).__name__}")
    return records


# ----------------------------------------------------------------------------- CLI


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llava_contrastive.data.check",
                                description="Check a LLaVA training corpus (records and images) before training.")
    p.add_argument("--data_path", required=True)
    p.add_argument("--image_folder", default=None)
    p.add_argument("--mode", default="quick", choices=MODES, help="off = records only (no file access)")
    p.add_argument("--stage", default="pretrain", choices=STAGES,
                   help="pretrain = plain template (stage 1); instruct = multi-turn (stage 2)")
    p.add_argument("--model_name_or_path", default=None, help="LLM folder: its tokenizer measures prompts/captions")
    p.add_argument("--model_max_length", type=int, default=None)
    p.add_argument("--image_tokens", type=int, default=0, help="patch tokens per image (576 for CLIP-L/14-336)")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--cache", default=None, help="cache file (default: next to the data file)")
    p.add_argument("--no_cache", action="store_true")
    p.add_argument("--max_items", type=int, default=20)
    p.add_argument("--json", default=None, help="also write the full report (with every bad record) here")
    p.add_argument("--no_progress", action="store_true")
    a = p.parse_args(argv)

    tokenizer = None
    if a.model_name_or_path:
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(a.model_name_or_path, use_fast=False)
    records = load_records(a.data_path)
    cache = None if a.no_cache else (a.cache or default_cache_path(a.data_path, a.image_folder, a.mode, a.stage))
    report = check_records(records, a.image_folder, mode=a.mode, tokenizer=tokenizer,
                           model_max_length=a.model_max_length, image_tokens=a.image_tokens, stage=a.stage,
                           workers=a.workers, cache_path=cache, progress=not a.no_progress)
    print(report.summary(max_items=a.max_items))
    print(f"throughput: {report.n_records / max(report.seconds, 1e-9):.0f} records/s")
    if a.json:
        write_json_atomic(a.json, report.to_json(), indent=1)
    return 1 if report.bad else 0


if __name__ == "__main__":
    sys.exit(main())
