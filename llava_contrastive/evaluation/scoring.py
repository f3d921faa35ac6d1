"""Pure scorers for the downstream benchmarks (no file IO, no torch).

Every scorer takes ground truth and answers keyed by ``str(question_id)`` and returns a dict with
``metrics`` (benchmark-specific, numbers in [0, 1] unless named ``score``), ``primary`` (one number in
[0, 100] for cross-benchmark averages) and ``questions``: one entry per scored unit, in ground-truth
order, ``{"question_id", "correct" (0/1), "group", "category"}`` for bootstraps over questions
(``group`` ties units that must be resampled together: the image of an MME pair).

Answer normalisation follows the upstream tools:
- POPE: ``llava/eval/eval_pope.py`` (first sentence, commas dropped, "no" if the words hold
  ``No``/``no``/``not``, else "yes"); precision/recall/F1 with positive = yes, per category.
- MME: MME's ``calculation.py`` (lower-cased; exact ``yes``/``no``, else ``yes``/``no`` within the
  first 4 characters, else "other" = wrong); score = (accuracy + accuracy+) x 100 per category.
- MMBench: VLMEvalKit's ``can_infer`` (exactly one option letter as a standalone token, else
  exactly one option text inside the answer, else no answer); circular evaluation over rotations.
- GQA / textqa: upstream's ``convert_gqa_for_eval`` (strip, trailing ``.`` removed, lower-cased) then
  the VQA (EvalAI / ``m4c_evaluator``) processing: punctuation, number words to digits, articles.
"""
from __future__ import annotations

import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

# ----------------------------------------------------------------------------- POPE


def pope_yes_no(text: str) -> str:
    """``eval_pope.py``'s reading of an answer: ``"yes"`` or ``"no"``."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0  # upstream raises ZeroDivisionError here; we report 0


def pope_metrics(labels: Sequence[str], preds: Sequence[str]) -> Dict[str, float]:
    """Accuracy, precision, recall, F1 (positive = yes) and yes-ratio of yes/no predictions."""
    if len(labels) != len(preds) or not labels:
        raise ValueError(f"need equal, non-empty label/prediction lists (got {len(labels)}, {len(preds)})")
    tp = sum(p == "yes" and y == "yes" for p, y in zip(preds, labels))
    fp = sum(p == "yes" and y == "no" for p, y in zip(preds, labels))
    tn = sum(p == "no" and y == "no" for p, y in zip(preds, labels))
    fn = sum(p == "no" and y == "yes" for p, y in zip(preds, labels))
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {
        "accuracy": (tp + tn) / len(labels),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": preds.count("yes") / len(preds),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": len(labels),
    }


def _missing(gt_ids: Sequence[str], answers: Mapping[str, str], answered_only: bool) -> List[str]:
    miss = [q for q in gt_ids if q not in answers]
    if miss and not answered_only:
        raise KeyError(f"{len(miss)} questions have no answer (first: {miss[:3]}); "
                       "answer them all or score with answered_only=True (--answered_only)")
    return miss


def score_pope(gt: Sequence[Tuple[str, str, str]], answers: Mapping[str, str], answered_only: bool = False) -> dict:
    """``gt``: (question_id, category, label yes/no) in question order; ``answers``: qid -> text."""
    _missing([q for q, _, _ in gt], answers, answered_only)
    rows = [(q, c, y, pope_yes_no(answers[q])) for q, c, y in gt if q in answers]
    cats = list(dict.fromkeys(c for _, c, _ in gt))
    per = {}
    for c in cats:
        sel = [(y, p) for _, cc, y, p in rows if cc == c]
        if sel:
            per[c] = pope_metrics([y for y, _ in sel], [p for _, p in sel])
    metrics = {"categories": per,
               "f1": sum(m["f1"] for m in per.values()) / len(per),
               "accuracy": sum(m["accuracy"] for m in per.values()) / len(per),
               "yes_ratio": sum(m["yes_ratio"] for m in per.values()) / len(per),
               "n": len(rows)}
    qs = [{"question_id": q, "correct": int(y == p), "group": q, "category": c} for q, c, y, p in rows]
    return {"metrics": metrics, "primary": 100 * metrics["f1"], "questions": qs}


# ----------------------------------------------------------------------------- MME


def mme_yes_no(text: str) -> str:
    """MME's ``parse_pred_ans``: ``"yes"``, ``"no"`` or ``"other"``."""
    t = text.strip().lower()
    if t in ("yes", "no"):
        return t
    head = t[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def score_mme(gt: Sequence[Tuple[str, str, str, str]], answers: Mapping[str, str], answered_only: bool = False) -> dict:
    """``gt``: (question_id, category, pair_id, answer yes/no). Score per category =
    100 x (accuracy + accuracy+), accuracy+ = share of images with both questions right; total = sum."""
    miss = set(_missing([q for q, _, _, _ in gt], answers, answered_only))
    # a pair with a missing answer is left out entirely (only possible with answered_only)
    bad_pairs = {(c, p) for q, c, p, _ in gt if q in miss}
    rows = [(q, c, p, int(mme_yes_no(answers[q]) == a)) for q, c, p, a in gt if (c, p) not in bad_pairs]
    per: Dict[str, Dict[str, float]] = {}
    for c in dict.fromkeys(c for _, c, _, _ in rows):
        sel = [(p, ok) for _, cc, p, ok in rows if cc == c]
        pairs: Dict[str, List[int]] = {}
        for p, ok in sel:
            pairs.setdefault(p, []).append(ok)
        acc = sum(ok for _, ok in sel) / len(sel)
        acc_plus = sum(all(v) for v in pairs.values()) / len(pairs)
        per[c] = {"accuracy": acc, "accuracy_plus": acc_plus, "score": 100 * (acc + acc_plus),
                  "n": len(sel), "n_images": len(pairs)}
    total = sum(m["score"] for m in per.values())
    metrics = {"categories": per, "score": total, "n": len(rows)}
    qs = [{"question_id": q, "correct": ok, "group": f"{c}/{p}", "category": c} for q, c, p, ok in rows]
    # primary: mean over categories of (acc + acc+)/2, in percent (total / (2 x categories))
    return {"metrics": metrics, "primary": total / (2 * len(per)) if per else 0.0, "questions": qs}


# ----------------------------------------------------------------------------- MMBench

_OPTION_PUNCT = ".()[],:;!*#{}"


def extract_option(text: str, options: Mapping[str, str]) -> Optional[str]:
    """The option letter an answer chooses, as MMBench's ``can_infer``: first exactly one option
    letter as a standalone token (punctuation ``.()[],:;!*#{}`` counts as space), else exactly one
    option text (lower-cased) contained in the answer; else None."""
    mod = text
    for ch in _OPTION_PUNCT:
        mod = mod.replace(ch, " ")
    tokens = mod.split()
    hits = [k for k in options if k in tokens]
    if len(hits) == 1:
        return hits[0]
    low = text.lower()
    hits = [k for k, v in options.items() if str(v).lower() in low]
    return hits[0] if len(hits) == 1 else None


def score_mmbench(rows: Sequence[Mapping[str, object]], answers: Mapping[str, str], offset: int,
                  answered_only: bool = False) -> dict:
    """Circular evaluation. ``rows``: TSV rows (``index``, ``A``..``D``, ``answer``, ``category``);
    rotations of one question share ``index % offset``; a question is right only if every rotation
    is answered with its right letter. Also reports plain per-row accuracy (``vanilla_accuracy``)."""
    _missing([str(r["index"]) for r in rows], answers, answered_only)
    groups: Dict[int, List[Tuple[int, str]]] = {}
    cats: Dict[int, str] = {}
    for r in rows:
        idx = int(r["index"])
        key = str(idx)
        g = idx % offset
        cats[g] = str(r["category"])
        if key not in answers:
            groups.setdefault(g, []).append((-1, key))  # marks an incomplete group
            continue
        opts = {k: str(r[k]) for k in "ABCD" if k in r and r[k] not in (None, "") and str(r[k]).lower() != "nan"}
        groups.setdefault(g, []).append((int(extract_option(answers[key], opts) == r["answer"]), key))
    qs, row_hits, row_n = [], 0, 0
    for g, res in groups.items():
        if any(ok < 0 for ok, _ in res):
            continue
        row_hits += sum(ok for ok, _ in res)
        row_n += len(res)
        qs.append({"question_id": str(g), "correct": int(all(ok for ok, _ in res)), "group": str(g),
                   "category": cats[g]})
    per = {}
    for c in dict.fromkeys(q["category"] for q in qs):
        sel = [q["correct"] for q in qs if q["category"] == c]
        per[c] = {"circular_accuracy": sum(sel) / len(sel), "n": len(sel)}
    acc = sum(q["correct"] for q in qs) / len(qs) if qs else 0.0
    metrics = {"circular_accuracy": acc, "vanilla_accuracy": row_hits / row_n if row_n else 0.0,
               "categories": per, "n": len(qs), "n_rows": row_n}
    return {"metrics": metrics, "primary": 100 * acc, "questions": qs}


# ----------------------------------------------------------------------------- GQA / textqa

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # as the EvalAI processor writes it
_COMMA_NUM = re.compile(r"(?<=\d)(\,)+(?=\d)")


def normalize_answer(text: str) -> str:
    """Upstream's GQA conversion (strip, rstrip ".", lower) then the VQA answer processing."""
    t = text.strip().rstrip(".").lower()
    t = t.replace(",", "").replace("?", "").replace("'s", " 's").strip()
    t = t.replace("\n", " ").replace("\t", " ").strip()
    out = t
    for p in _PUNCT:
        if (p + " " in t or " " + p in t) or _COMMA_NUM.search(t) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out, count=32)  # the EvalAI processor passes re.UNICODE (32) as count
    words = [_NUMBERS.get(w, w) for w in out.split()]
    return " ".join(w for w in words if w not in _ARTICLES)


def score_exact(gt: Sequence[Tuple[str, str, str]], answers: Mapping[str, str], answered_only: bool = False) -> dict:
    """Exact match after :func:`normalize_answer`. ``gt``: (question_id, category, answer)."""
    _missing([q for q, _, _ in gt], answers, answered_only)
    qs = [{"question_id": q, "correct": int(normalize_answer(answers[q]) == normalize_answer(a)), "group": q,
           "category": c} for q, c, a in gt if q in answers]
    per = {}
    for c in dict.fromkeys(q["category"] for q in qs):
        sel = [q["correct"] for q in qs if q["category"] == c]
        per[c] = {"accuracy": sum(sel) / len(sel), "n": len(sel)}
    acc = sum(q["correct"] for q in qs) / len(qs) if qs else 0.0
    return {"metrics": {"accuracy": acc, "categories": per, "n": len(qs)}, "primary": 100 * acc, "questions": qs}
