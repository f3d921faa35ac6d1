"""Host-agnostic VQA inference loop with upstream ``llava.eval.model_vqa_loader``'s flags and files.

Question file: JSON lines with ``question_id``, ``text`` and (optional: text-only questions have none)
``image`` (relative to ``--image-folder``). Answers file: one JSON per line, exactly upstream's keys
``question_id, prompt, text, answer_id, model_id, metadata``. Differences from upstream's script:
runs on CPU and GPU, batches (greedy answers do not depend on the batch size), and resumes: questions
already in the answers file are skipped and new answers are appended (upstream truncates the file).

A host supplies an *answerer*: ``model_id`` (str) and ``answer(batch: list[dict]) -> list[str]``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Protocol, Sequence

ANSWER_KEYS = ("question_id", "prompt", "text", "answer_id", "model_id", "metadata")


class Answerer(Protocol):
    model_id: str

    def answer(self, batch: List[dict]) -> List[str]: ...


class VQAUsageError(ValueError):
    """A bad flag or file: reported with exit code 2 before any model loads."""


# ---- pure helpers ---------------------------------------------------------------------------
def get_chunk(items: Sequence, num_chunks: int, chunk_idx: int) -> list:
    """Chunk ``chunk_idx`` of ``num_chunks`` as upstream's ``get_chunk`` cuts it: chunks of
    ceil(len / num_chunks) items in order. Where upstream raises IndexError (fewer chunks than
    ``num_chunks``, e.g. 5 items in 4 chunks), the missing chunks are empty."""
    if num_chunks < 1 or not 0 <= chunk_idx < num_chunks:
        raise VQAUsageError(f"--chunk-idx {chunk_idx} must be in [0, --num-chunks {num_chunks})")
    size = -(-len(items) // num_chunks)
    return list(items[chunk_idx * size:(chunk_idx + 1) * size])


def batches(questions: Sequence[dict], batch_size: int) -> List[List[dict]]:
    """Consecutive batches of at most ``batch_size`` questions, never mixing image and text-only
    questions (a host runs the vision tower for a whole batch or not at all)."""
    out: List[List[dict]] = []
    for q in questions:
        if out and len(out[-1]) < batch_size and has_image(out[-1][0]) == has_image(q):
            out[-1].append(q)
        else:
            out.append([q])
    return out


def has_image(question: dict) -> bool:
    return bool(question.get("image"))


def answer_record(question: dict, text: str, model_id: str, answer_id: str) -> dict:
    """One answers-file line, keys and order as upstream's model_vqa_loader writes them."""
    return {"question_id": question["question_id"], "prompt": question["text"], "text": text,
            "answer_id": answer_id, "model_id": model_id, "metadata": {}}


def read_questions(path: str) -> List[dict]:
    """JSON lines with ``question_id`` and ``text`` (``image`` optional); errors name the line."""
    if not os.path.isfile(path):
        raise VQAUsageError(f"--question-file {path}: no such file")
    questions = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
            except json.JSONDecodeError as err:
                raise VQAUsageError(f"--question-file {path}:{n}: not JSON ({err})") from err
            missing = [k for k in ("question_id", "text") if k not in q]
            if missing:
                raise VQAUsageError(f"--question-file {path}:{n}: missing {missing} (each line needs "
                                    "question_id, text and, for image questions, image)")
            questions.append(q)
    return questions


def answered_ids(path: str) -> set:
    """Question ids already in an answers file. A last line cut short by a kill is removed from
    the file (its question is answered again)."""
    if not os.path.isfile(path):
        return set()
    with open(path, "rb") as f:
        data = f.read()
    keep = data.rfind(b"\n") + 1  # everything after the last newline is a partial line
    if keep < len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
    ids = set()
    for n, line in enumerate(data[:keep].decode().splitlines(), 1):
        if line.strip():
            try:
                ids.add(_key(json.loads(line)["question_id"]))
            except (json.JSONDecodeError, KeyError) as err:
                raise VQAUsageError(f"--answers-file {path}:{n}: not an answers line ({err}); "
                                    "move the file away to start over") from err
    return ids


def _key(question_id) -> str:
    return json.dumps(question_id)  # 1 and "1" stay distinct; any JSON value is hashable this way


def until_eos(row, eos_id):
    """The generated tokens (a 1-D tensor) before the first EOS (one id, or several: a chat template's
    end-of-turn marker too): the rest of a batch row is padding."""
    import torch

    ids = [i for i in (eos_id if isinstance(eos_id, (list, tuple)) else [eos_id]) if i is not None]
    if not ids:
        return row
    hits = torch.isin(row, torch.tensor(ids, device=row.device)).nonzero()
    return row[: int(hits[0])] if len(hits) else row


_BASE57 = "23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"  # shortuuid's alphabet


def answer_id() -> str:
    """A random 22-character id like upstream's ``shortuuid.uuid()`` (used when installed)."""
    try:
        import shortuuid
    except ImportError:
        import uuid

        n, out = uuid.uuid4().int, ""
        for _ in range(22):
            n, r = divmod(n, 57)
            out += _BASE57[r]
        return out
    return shortuuid.uuid()


# ---- flags ------------------------------------------------------------------------------------
def build_parser(prog: str = "python -m llava_contrastive.vqa") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # upstream llava.eval.model_vqa_loader's flags (same names and defaults)
    p.add_argument("--model-path", type=str, default="facebook/opt-350m")
    p.add_argument("--model-base", type=str, default=None, help="base LLM of an unmerged LoRA / projector-only dir")
    p.add_argument("--image-folder", type=str, default="")
    p.add_argument("--question-file", type=str, default="tables/question.jsonl")
    p.add_argument("--answers-file", type=str, default="answer.jsonl")
    p.add_argument("--conv-mode", type=str, default="llava_v1")
    p.add_argument("--num-chunks", type=int, default=1)
    p.add_argument("--chunk-idx", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.2, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--num_beams", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=128)
    # ours
    p.add_argument("--batch_size", type=int, default=1, help="questions per generate call (left padding)")
    p.add_argument("--host", choices=("llava", "hf"), default="llava")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help="auto: float16 on GPU (upstream's), float32 on CPU")
    p.add_argument("--image_aspect_ratio", choices=("pad", "square"), default="pad",
                   help="hf host only (upstream's host reads it from the model config)")
    p.add_argument("--no_progress", action="store_true", help="no tqdm bar")
    return p


def check_args(args: argparse.Namespace) -> None:
    """User errors, before any model loads."""
    if args.batch_size < 1:
        raise VQAUsageError(f"--batch_size {args.batch_size}: must be >= 1")
    if args.temperature < 0:
        raise VQAUsageError(f"--temperature {args.temperature}: must be >= 0 (0 = greedy)")
    if args.max_new_tokens < 1:
        raise VQAUsageError(f"--max_new_tokens {args.max_new_tokens}: must be >= 1")
    get_chunk([], args.num_chunks, args.chunk_idx)
    if not os.path.exists(os.path.expanduser(args.model_path)):
        raise VQAUsageError(f"--model-path {args.model_path}: no such directory (this entry loads local "
                            "checkpoints; download hub models first)")
    if args.model_base and not os.path.exists(os.path.expanduser(args.model_base)):
        raise VQAUsageError(f"--model-base {args.model_base}: no such directory")


def resolve_device(choice: str, cuda_available: bool) -> str:
    if choice == "cuda" and not cuda_available:
        raise VQAUsageError("--device cuda: no CUDA device visible; use --device cpu or auto")
    return ("cuda" if cuda_available else "cpu") if choice == "auto" else choice


def resolve_dtype(choice: str, device: str) -> str:
    """auto: float16 on GPU (what upstream's eval scripts run), float32 on CPU (half-precision
    matmuls on CPU are slow and round differently)."""
    if choice != "auto":
        return choice
    return "float16" if device == "cuda" else "float32"


# ---- the loop ---------------------------------------------------------------------------------
@dataclass
class VQAResult:
    answers_file: str
    questions: int        # in this chunk
    skipped: int          # already answered (resume)
    written: int
    seconds: float        # generation time (model load excluded)

    @property
    def answers_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else float("nan")


def answer_questions(answerer: Answerer, questions: Sequence[dict], answers_file: str, batch_size: int = 1,
                     progress: bool = True, new_id: Optional[Callable[[], str]] = None) -> VQAResult:
    """Answer the questions not yet in ``answers_file``, appending one line per answer (flushed per
    batch, so a kill loses at most the batch in flight)."""
    new_id = new_id or answer_id
    done = answered_ids(answers_file)
    todo = [q for q in questions if _key(q["question_id"]) not in done]
    os.makedirs(os.path.dirname(os.path.abspath(answers_file)), exist_ok=True)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(questions), initial=len(questions) - len(todo), desc="vqa", unit="q")
    written, start = 0, time.perf_counter()
    with open(answers_file, "a") as f:
        for batch in batches(todo, batch_size):
            texts = answerer.answer(batch)
            if len(texts) != len(batch):
                raise RuntimeError(f"answerer returned {len(texts)} answers for {len(batch)} questions")
            for q, text in zip(batch, texts):
                f.write(json.dumps(answer_record(q, text, answerer.model_id, new_id())) + "\n")
            f.flush()
            written += len(batch)
            if bar is not None:
                bar.update(len(batch))
    if bar is not None:
        bar.close()
    return VQAResult(answers_file, len(questions), len(questions) - len(todo), written,
                     time.perf_counter() - start)


def run(argv: Optional[Sequence[str]], load_answerer: Callable[[argparse.Namespace], Answerer],
        host: str) -> VQAResult:
    """Parse flags, load the host's model, answer this chunk's questions. VQAUsageError for user errors."""
    parser = build_parser()
    parser.set_defaults(host=host)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.host != host:
        raise VQAUsageError(f"--host {args.host} given to the {host} host's entry; use "
                            f"`python -m llava_contrastive.vqa --host {args.host}`")
    check_args(args)
    questions = get_chunk(read_questions(os.path.expanduser(args.question_file)), args.num_chunks, args.chunk_idx)
    answerer = load_answerer(args)
    return answer_questions(answerer, questions, os.path.expanduser(args.answers_file), args.batch_size,
                            progress=not args.no_progress)


def main_for_host(argv: Optional[Sequence[str]], load_answerer: Callable[[argparse.Namespace], Answerer],
                  host: str) -> int:
    try:
        result = run(argv, load_answerer, host)
    except VQAUsageError as err:
        sys.stderr.write(f"vqa: {err}\n")
        return 2
    sys.stderr.write(f"vqa: {result.written} new answers ({result.skipped} already there) in "
                     f"{result.seconds:.1f} s ({result.answers_per_second:.2f} answers/s) -> {result.answers_file}\n")
    return 0


def iter_answers(path: str) -> Iterable[Dict]:
    """Lines of an answers file (for scorers and tests)."""
    with open(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
