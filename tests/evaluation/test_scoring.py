"""Benchmark scorers vs hand-computed cases, and upstream's own eval_pope.py on the same answers file."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llava_contrastive import cli
from llava_contrastive.evaluation import benchmarks as B
from llava_contrastive.evaluation import score as score_entry
from llava_contrastive.evaluation import scoring as S

VENV_PY = Path(sys.executable)


# ----------------------------------------------------------------------------- POPE


def test_pope_yes_no_reading():
    # eval_pope.py: first sentence only, commas dropped, "No"/"no"/"not" as a word -> no
    assert S.pope_yes_no("Yes") == "yes"
    assert S.pope_yes_no("No") == "no"
    assert S.pope_yes_no("No, there is not.") == "no"
    assert S.pope_yes_no("Yes. No.") == "yes"  # only the first sentence counts
    assert S.pope_yes_no("There is not a red circle") == "no"
    assert S.pope_yes_no("NO") == "yes"  # upstream is case-sensitive
    assert S.pope_yes_no("nothing here") == "yes"  # "nothing" is not the word "no"
    assert S.pope_yes_no("a red circle") == "yes"


def test_pope_hand_case():
    # labels:  y y y n n n   preds: y y n y n n  -> TP 2, FN 1, FP 1, TN 2
    gt = [(str(i), "random", y) for i, y in enumerate("yes yes yes no no no".split())]
    ans = {"0": "Yes", "1": "yes.", "2": "No", "3": "Yes, there is.", "4": "no", "5": "There is not."}
    r = S.score_pope(gt, ans)
    m = r["metrics"]["categories"]["random"]
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 2, 1)
    assert m["accuracy"] == pytest.approx(4 / 6) and m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 6)
    assert [q["correct"] for q in r["questions"]] == [1, 1, 0, 0, 1, 1]
    assert r["primary"] == pytest.approx(100 * 2 / 3)
    with pytest.raises(KeyError, match="no answer"):
        S.score_pope(gt, {"0": "yes"})
    assert S.score_pope(gt, {"0": "yes"}, answered_only=True)["metrics"]["n"] == 1


def _parse_upstream(out: str):
    """eval_pope.py's printout -> {category: (acc, precision, recall, f1, yes_ratio, (tp, fp, tn, fn))}."""
    res = {}
    for block in out.split("Category: ")[1:]:
        cat = block.split(",")[0]
        counts = tuple(int(x) for x in block.split("TP\tFP\tTN\tFN\t\n")[1].split("\n")[0].split("\t"))
        get = lambda name: float(re.search(rf"{name}: (\S+)", block).group(1))  # noqa: E731
        res[cat] = (get("Accuracy"), get("Precision"), get("Recall"), get("F1 score"), get("Yes ratio"), counts)
    return res


def test_pope_matches_upstream_eval_pope(tmp_path):
    llava = pytest.importorskip("llava")
    script = Path(llava.__file__).parent / "eval" / "eval_pope.py"
    src = script.read_text()
    assert '"--annotation-dir"' in src and '"--question-file"' in src and '"--result-file"' in src
    root = tmp_path / "eval"
    B.build_benchmarks(root, seed=2, questions=200)
    f = B.bench_files(root, "pope", "test")
    qs = B.read_jsonl(f.question_file)
    styles = ["Yes", "No", "yes.", "No, there is not.", "There is no such shape.", "Yes, there is a circle. No.",
              "I do not see it", "a red circle"]
    with open(tmp_path / "answers.jsonl", "w") as fh:  # model_vqa_loader format, question order
        for i, q in enumerate(qs):
            text = styles[(i * 7 + i // 3) % len(styles)]
            fh.write(json.dumps({"question_id": q["question_id"], "prompt": q["text"], "text": text,
                                 "answer_id": f"a{i}", "model_id": "m", "metadata": {}}) + "\n")
    proc = subprocess.run([str(VENV_PY), str(script), "--annotation-dir", str(f.annotation), "--question-file",
                           str(f.question_file), "--result-file", str(tmp_path / "answers.jsonl")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    up = _parse_upstream(proc.stdout)
    assert set(up) == set(B.POPE_CATEGORIES)
    out = tmp_path / "pope.json"
    assert score_entry.main(["--benchmark", "pope", "--bench_dir", str(root), "--answers_file",
                             str(tmp_path / "answers.jsonl"), "--output", str(out)]) == 0
    ours = json.loads(out.read_text())["metrics"]["categories"]
    for cat, (acc, p, r, f1, yr, counts) in up.items():
        m = ours[cat]
        assert (m["tp"], m["fp"], m["tn"], m["fn"]) == counts
        assert (m["accuracy"], m["precision"], m["recall"], m["f1"], m["yes_ratio"]) == pytest.approx((acc, p, r, f1, yr), abs=1e-12)
    assert len({m["f1"] for m in ours.values()}) > 1  # a non-trivial case


# ----------------------------------------------------------------------------- MME


def test_mme_hand_case():
    assert [S.mme_yes_no(t) for t in ["Yes", " no ", "Yes, it is.", "Nope", "maybe", "It is not"]] == \
        ["yes", "no", "yes", "no", "other", "other"]
    gt = [("0", "color", "a", "yes"), ("1", "color", "a", "no"),  # both right
          ("2", "color", "b", "yes"), ("3", "color", "b", "no"),  # one right
          ("4", "count", "c", "no"), ("5", "count", "c", "yes")]  # both wrong
    ans = {"0": "Yes", "1": "No", "2": "Yes", "3": "yes", "4": "maybe", "5": "no"}
    r = S.score_mme(gt, ans)
    col, cnt = r["metrics"]["categories"]["color"], r["metrics"]["categories"]["count"]
    # color: acc 3/4, acc+ 1/2 -> 125; count: acc 0, acc+ 0 -> 0
    assert col["accuracy"] == 0.75 and col["accuracy_plus"] == 0.5 and col["score"] == pytest.approx(125.0)
    assert cnt["score"] == 0.0 and r["metrics"]["score"] == pytest.approx(125.0)
    assert r["primary"] == pytest.approx(125.0 / 4)
    assert [q["correct"] for q in r["questions"]] == [1, 1, 1, 0, 0, 0]
    # answered_only drops a pair with a missing answer
    part = S.score_mme(gt, {k: v for k, v in ans.items() if k != "3"}, answered_only=True)
    assert part["metrics"]["categories"]["color"]["n_images"] == 1


# ----------------------------------------------------------------------------- MMBench


def test_extract_option():
    opts = {"A": "red", "B": "green", "C": "blue", "D": "dark red"}
    assert S.extract_option("B", opts) == "B"
    assert S.extract_option("(C) blue", opts) == "C"
    assert S.extract_option("The answer is D.", opts) == "D"
    assert S.extract_option("green", opts) == "B"  # no letter: the option text
    assert S.extract_option("It is Blue", opts) == "C"
    assert S.extract_option("dark red", opts) is None  # "red" and "dark red" both inside: ambiguous
    assert S.extract_option("A or B", opts) is None
    assert S.extract_option("purple", opts) is None


def test_mmbench_circular_hand_case():
    off = B.MMBENCH_ROTATION_OFFSET
    opts = ["red", "green", "blue", "white"]
    rows = []
    for base, right in ((0, 1), (1, 2)):
        for k, (rot, ans) in enumerate(B.rotations(opts, right)):
            rows.append({"index": str(base + k * off), "A": rot[0], "B": rot[1], "C": rot[2], "D": rot[3],
                         "answer": "ABCD"[ans], "category": "attribute"})
    # question 0 (green) right in all 4 rotations (by letter or by text); question 1 (blue) wrong once
    ans = {}
    for r in rows:
        ans[r["index"]] = r["answer"] if int(r["index"]) % off == 0 else r[r["answer"]]
    # rotation 2 of question 1 reads [blue, white, red, green]: right is A; answer D (green) instead
    r2 = next(r for r in rows if r["index"] == str(1 + 2 * off))
    assert [r2[k] for k in "ABCD"] == ["blue", "white", "red", "green"] and r2["answer"] == "A"
    ans[str(1 + 2 * off)] = "D. green"
    res = S.score_mmbench(rows, ans, off)
    assert res["metrics"]["circular_accuracy"] == 0.5 and res["metrics"]["vanilla_accuracy"] == 7 / 8
    assert [(q["question_id"], q["correct"]) for q in res["questions"]] == [("0", 1), ("1", 0)]
    assert B.rotations(["a", "b", "c", "d"], 1)[1] == (["b", "c", "d", "a"], 0)


# ----------------------------------------------------------------------------- GQA / textqa


def test_normalize_matches_upstream_processor():
    m4c = pytest.importorskip("llava.eval.m4c_evaluator")
    proc = m4c.EvalAIAnswerProcessor()
    cases = ["Red.", "red", "Two", "2", "The red one", "top left", "A circle.", "yes!", "No, it is not.",
             "bottom-right", "3.5", "1,000", "it's blue", "Purple ", "an orange", "none", "(blue)", "zero"]
    for c in cases:
        assert S.normalize_answer(c) == proc(c.strip().rstrip(".").lower()), c


def test_exact_hand_case():
    gt = [("a", "color", "red"), ("b", "count", "2"), ("c", "count", "three"), ("d", "position", "left")]
    ans = {"a": "Red.", "b": "two", "c": "3", "d": "On the left"}
    r = S.score_exact(gt, ans)
    assert [q["correct"] for q in r["questions"]] == [1, 1, 1, 0]
    assert r["metrics"]["accuracy"] == 0.75 and r["metrics"]["categories"]["count"]["accuracy"] == 1.0


# ----------------------------------------------------------------------------- the score entry point


def _perfect_answers(root: Path, bench: str, split: str):
    f = B.bench_files(root, bench, split)
    if bench == "pope":
        return {str(r["question_id"]): r["label"].capitalize() for c in B.POPE_CATEGORIES
                for r in B.read_jsonl(f.annotation / f"coco_pope_{c}.json")}
    if bench == "mme":
        return {str(r["question_id"]): r["answer"] for r in B.read_jsonl(f.annotation)}
    if bench == "mmbench":
        return {r["index"]: r["answer"] for r in B.read_mmbench_tsv(f.table)}
    if bench == "gqa":
        return {k: v["answer"] + "." for k, v in json.loads(f.annotation.read_text()).items()}
    return {str(r["question_id"]): r["answer"] for r in B.read_jsonl(f.annotation)}


def test_score_entry_all_benchmarks(tmp_path):
    root = tmp_path / "eval"
    B.build_benchmarks(root, seed=1, questions=40)
    for bench in B.BENCHMARKS:
        for split in B.SPLITS:
            ans = _perfect_answers(root, bench, split)
            qs = B.read_jsonl(B.bench_files(root, bench, split).question_file)
            assert {str(q["question_id"]) for q in qs} == set(ans)
            af = tmp_path / f"{bench}_{split}.jsonl"
            af.write_text("".join(json.dumps({"question_id": q["question_id"], "prompt": q["text"],
                                              "text": ans[str(q["question_id"])], "answer_id": "x", "model_id": "m",
                                              "metadata": {}}) + "\n" for q in qs))
            out = tmp_path / f"{bench}_{split}.json"
            argv = ["--benchmark", bench, "--bench_dir", str(root), "--answers_file", str(af), "--split", split,
                    "--output", str(out)]
            assert score_entry.main(argv) == 0
            res = json.loads(out.read_text())
            assert res["primary"] == pytest.approx(100.0), (bench, split)
            assert res["questions"] and all(q["correct"] == 1 for q in res["questions"])
    # all-"yes" answers on MME: accuracy 1/2 and accuracy+ 0 in every category
    f = B.bench_files(root, "mme", "test")
    af = tmp_path / "yes.jsonl"
    af.write_text("".join(json.dumps({"question_id": r["question_id"], "text": "Yes"}) + "\n" for r in B.read_jsonl(f.annotation)))
    res = score_entry.run(["--benchmark", "mme", "--bench_dir", str(root), "--answers_file", str(af), "--output", str(tmp_path / "y.json")])
    assert res["metrics"]["score"] == pytest.approx(50.0 * len(B.MME_CATEGORIES))


def test_score_entry_user_errors(tmp_path, capsys):
    root = tmp_path / "eval"
    B.build_benchmarks(root, seed=1, questions=20)
    base = ["--benchmark", "gqa", "--bench_dir", str(root), "--output", str(tmp_path / "o.json")]
    assert score_entry.main(base + ["--answers_file", str(tmp_path / "nope.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err
    part = tmp_path / "part.jsonl"
    part.write_text(json.dumps({"question_id": "0", "text": "red"}) + "\n")
    assert score_entry.main(base + ["--answers_file", str(part)]) == 2
    assert "--answered_only" in capsys.readouterr().err
    assert score_entry.main(base + ["--answers_file", str(part), "--answered_only"]) == 0
    assert score_entry.main(["--benchmark", "gqa", "--bench_dir", str(tmp_path / "x"), "--answers_file", str(part),
                             "--output", str(tmp_path / "o.json")]) == 2
    assert cli.resolve("score", None) == "llava_contrastive.evaluation.score"
