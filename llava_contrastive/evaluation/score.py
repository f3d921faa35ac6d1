"""``python -m llava_contrastive.score`` / ``llava-contrastive score``: score one answers file.

``--benchmark pope|mme|mmbench|gqa|textqa --bench_dir DIR --answers_file F [--split test] --output F.json``

``DIR`` is a benchmark root as written by ``evaluation/benchmarks.py`` (``playground/tiny/data/eval``
for the tiny assets); ``F`` is an answers file in upstream ``model_vqa_loader`` format (one JSON per
line with ``question_id`` and ``text``; for MMBench one line per TSV row, ``question_id`` = row
``index``). A question answered twice keeps its last answer (resumed files). The output JSON holds
the metrics, a ``primary`` number in [0, 100] and the per-question correctness (``questions``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

from llava_contrastive.evaluation import benchmarks as B
from llava_contrastive.evaluation import scoring as S


class UserError(Exception):
    """A bad flag or a missing file: exit code 2 with this message."""


def read_answers(path: Path) -> Dict[str, str]:
    """question_id (as str) -> answer text; later lines win."""
    out: Dict[str, str] = {}
    with open(path, "r", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                out[str(rec["question_id"])] = str(rec["text"])
            except (ValueError, KeyError) as err:
                raise UserError(f"{path}:{n}: not an answers line with question_id and text ({err})") from err
    return out


def score_benchmark(bench_dir: Path, benchmark: str, answers: Dict[str, str], split: str = "test",
                    answered_only: bool = False) -> dict:
    """Ground truth of ``benchmark``/``split`` under ``bench_dir`` against ``answers``."""
    files = B.bench_files(bench_dir, benchmark, split)
    if not files.annotation.exists():
        raise UserError(f"{files.annotation} not found: build the benchmarks (python -m llava_contrastive.tiny) "
                        "or point --bench_dir at the folder holding pope/ mme/ mmbench/ gqa/ textqa/")
    if benchmark == "pope":
        qs = B.read_jsonl(files.question_file)
        cat_of = {str(q["question_id"]): q["category"] for q in qs}
        gt = []
        for cat in B.POPE_CATEGORIES:
            for r in B.read_jsonl(files.annotation / f"coco_pope_{cat}.json"):
                gt.append((str(r["question_id"]), cat_of.get(str(r["question_id"]), cat), r["label"]))
        return S.score_pope(gt, answers, answered_only)
    if benchmark == "mme":
        gt = [(str(r["question_id"]), r["category"], str(r["pair_id"]), r["answer"]) for r in B.read_jsonl(files.annotation)]
        return S.score_mme(gt, answers, answered_only)
    if benchmark == "mmbench":
        return S.score_mmbench(B.read_mmbench_tsv(files.table), answers, B.MMBENCH_ROTATION_OFFSET, answered_only)
    if benchmark == "gqa":
        ann = json.loads(files.annotation.read_text(encoding="utf-8"))
        gt = [(qid, a["types"]["detailed"], a["answer"]) for qid, a in ann.items()]
        return S.score_exact(gt, answers, answered_only)
    gt = [(str(r["question_id"]), r["category"], r["answer"]) for r in B.read_jsonl(files.annotation)]
    return S.score_exact(gt, answers, answered_only)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llava-contrastive score", description=__doc__.split("\n")[0])
    ap.add_argument("--benchmark", required=True, choices=B.BENCHMARKS)
    ap.add_argument("--bench_dir", required=True, help="benchmark root (holds pope/ mme/ mmbench/ gqa/ textqa/)")
    ap.add_argument("--answers_file", required=True, help="model_vqa_loader answers jsonl")
    ap.add_argument("--split", default="test", choices=B.SPLITS)
    ap.add_argument("--output", required=True, help="metrics JSON to write")
    ap.add_argument("--answered_only", action="store_true",
                    help="score only the answered questions (default: a missing answer is an error)")
    return ap


def run(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    ans_path = Path(args.answers_file)
    if not ans_path.is_file():
        raise UserError(f"--answers_file {ans_path} not found")
    try:
        res = score_benchmark(Path(args.bench_dir), args.benchmark, read_answers(ans_path), args.split, args.answered_only)
    except KeyError as err:
        raise UserError(f"{ans_path}: {err.args[0]}") from err
    out = {"benchmark": args.benchmark, "split": args.split, "bench_dir": str(Path(args.bench_dir).absolute()),
           "answers_file": str(ans_path.absolute()), **res}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        out = run(argv)
    except UserError as err:
        sys.stderr.write(f"llava-contrastive score: {err}\n")
        return 2
    print(f"{out['benchmark']} ({out['split']}): primary {out['primary']:.2f} over {len(out['questions'])} scored units")
    return 0


if __name__ == "__main__":
    sys.exit(main())
