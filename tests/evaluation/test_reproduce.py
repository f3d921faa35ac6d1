"""The reproduction runner (llava_contrastive.evaluation.reproduce): cells are reused, changed
settings are refused, failures resume; the report renders from report.json; one slow end-to-end smoke."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from llava_contrastive.evaluation import reproduce as R
from llava_contrastive.evaluation.stats import BenchmarkUnits, compare


def counting_cmd(counter: Path, out: Path, fail_flag: Path = None) -> list:
    """A cheap cell command: appends one line to ``counter``, writes ``out``; fails while ``fail_flag`` exists."""
    code = (f"import pathlib,sys; c=pathlib.Path({str(counter)!r}); c.open('a').write('x\\n'); "
            f"f={str(fail_flag) if fail_flag else ''!r}; "
            f"sys.exit(3) if f and pathlib.Path(f).exists() else pathlib.Path({str(out)!r}).write_text('ok')")
    return [sys.executable, "-c", code]


def runs(counter: Path) -> int:
    return len(counter.read_text().splitlines()) if counter.exists() else 0


def make_chains(tmp: Path, lr: str = "1e-3", fail_flag: Path = None):
    chains = []
    for arm in ("ntp_only", "joint"):
        for seed in (0, 1):
            d = tmp / "cells" / arm / f"seed{seed}"
            s1 = R.Cell(arm, seed, "stage1", d / "stage1",
                        [counting_cmd(tmp / f"count-{arm}-{seed}-s1", d / "stage1" / "out.txt")], {"lr": lr})
            s2 = R.Cell(arm, seed, "stage2", d / "stage2",
                        [counting_cmd(tmp / f"count-{arm}-{seed}-s2", d / "stage2" / "out.txt",
                                      fail_flag if (arm, seed) == ("joint", 1) else None)],
                        {"stage1": s1.settings_hash()})
            chains.append([s1, s2])
    return chains


def test_second_run_reuses_finished_cells(tmp_path):
    env = R.child_env(1)
    first = R.run_chains(make_chains(tmp_path), env, jobs=2, log=lambda m: None)
    assert len(first) == 8 and not any(m["reused"] for m in first)
    counts = {p.name: runs(p) for p in tmp_path.glob("count-*")}
    assert len(counts) == 8 and set(counts.values()) == {1}
    second = R.run_chains(make_chains(tmp_path), env, jobs=2, log=lambda m: None)
    assert all(m["reused"] for m in second)
    assert {p.name: runs(p) for p in tmp_path.glob("count-*")} == counts  # nothing ran again
    marker = json.loads((tmp_path / "cells/joint/seed1/stage2" / R.MARKER).read_text())
    assert marker["wall_seconds"] >= 0 and "-c" in marker["commands"][0]
    # the interpreter's path is not a setting: the same cell under another python is reused
    cell = make_chains(tmp_path)[0][0]
    other = R.Cell(cell.arm, cell.seed, cell.stage, cell.dir,
                   [["python" if c == sys.executable else c for c in cmd] for cmd in cell.commands], cell.settings)
    assert R.cell_state(other) == "done"


def test_changed_setting_is_refused_then_forced(tmp_path):
    env = R.child_env(1)
    R.run_chains(make_chains(tmp_path), env, log=lambda m: None)
    with pytest.raises(R.UserError, match="other settings.*--force") as err:
        R.run_chains(make_chains(tmp_path, lr="2e-3"), env, log=lambda m: None)
    assert "ntp_only/seed0/stage1" in str(err.value) and "joint/seed1/stage2" in str(err.value)
    assert {runs(p) for p in tmp_path.glob("count-*")} == {1}  # refused before any work
    # --force redoes the changed cells; stage 2 changed too (it depends on stage 1's settings hash)
    again = R.run_chains(make_chains(tmp_path, lr="2e-3"), env, force=True, log=lambda m: None)
    assert not any(m["reused"] for m in again)
    assert {runs(p) for p in tmp_path.glob("count-*")} == {2}


def test_failed_cell_stops_its_chain_and_a_rerun_continues(tmp_path):
    env = R.child_env(1)
    flag = tmp_path / "fail"
    flag.write_text("")
    with pytest.raises(R.CellFailed, match="joint/seed1/stage2: exit 3"):
        R.run_chains(make_chains(tmp_path, fail_flag=flag), env, jobs=2, log=lambda m: None)
    assert not (tmp_path / "cells/joint/seed1/stage2" / R.MARKER).exists()
    assert (tmp_path / "cells/joint/seed1/stage1" / R.MARKER).exists()
    assert (tmp_path / "cells/joint/seed1/stage2" / R.STARTED).exists()
    flag.unlink()
    again = R.run_chains(make_chains(tmp_path, fail_flag=flag), env, jobs=2, log=lambda m: None)
    ran = [(m["arm"], m["seed"], m["stage"]) for m in again if not m["reused"]]
    assert ran == [("joint", 1, "stage2")]
    assert runs(tmp_path / "count-joint-1-s2") == 2 and runs(tmp_path / "count-joint-1-s1") == 1


def test_unfinished_cell_with_other_settings_starts_over(tmp_path):
    cell = make_chains(tmp_path)[0][0]
    cell.dir.mkdir(parents=True)
    (cell.dir / "partial.bin").write_text("from a run with other settings")
    (cell.dir / R.STARTED).write_text(json.dumps({"settings_hash": "something-else"}))
    R.run_cell(cell, R.child_env(1), log=lambda m: None)
    assert not (cell.dir / "partial.bin").exists() and (cell.dir / R.MARKER).exists()
    # same settings: an unfinished cell keeps its files (the trainer / VQA entry resume from them)
    cell2 = make_chains(tmp_path)[1][0]
    cell2.dir.mkdir(parents=True)
    (cell2.dir / "answers.jsonl").write_text("{}\n")
    (cell2.dir / R.STARTED).write_text(json.dumps({"settings_hash": cell2.settings_hash()}))
    R.run_cell(cell2, R.child_env(1), log=lambda m: None)
    assert (cell2.dir / "answers.jsonl").exists()


def test_user_errors_exit_2_before_any_work(tmp_path, capsys):
    assert R.main(["--output_dir", str(tmp_path / "r"), "--arm", "no-equals-sign"]) == 2
    assert "NAME=" in capsys.readouterr().err
    assert R.main(["--output_dir", str(tmp_path / "r"), "--arms", "bogus"]) == 2
    assert "built-in arms" in capsys.readouterr().err
    assert R.main(["--output_dir", str(tmp_path / "r"), "--arms", "joint"]) == 2  # baseline missing
    assert "--baseline" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_parse_arm():
    assert R.parse_arm('w1_T0.03=--contrastive_weight 1 --contrastive_temperature "0.03"') == (
        "w1_T0.03", ["--contrastive_weight", "1", "--contrastive_temperature", "0.03"])


def fake_report(tmp_path: Path) -> dict:
    rng = np.random.default_rng(0)
    res = {arm: {s: {"pope": BenchmarkUnits("f1", [str(i) for i in range(40)], rng.integers(0, 2, (40, 3))),
                     "gqa": BenchmarkUnits("mean", [str(i) for i in range(30)], rng.random((30, 1)) < p)}
                 for s in range(2)} for arm, p in (("ntp_only", 0.4), ("joint", 0.6))}
    c = compare(res, "ntp_only", "joint", draws=100).as_dict()
    return {
        "title": "t", "command": "python -m llava_contrastive.reproduce --output_dir x", "tier": "tiny",
        "split": "test", "baseline": "ntp_only", "arms": {"ntp_only": "--contrastive_weight 0", "joint": ""},
        "seeds": [0, 1], "benchmarks": ["pope", "gqa"], "steps": {"stage1": 3, "stage2": 4},
        "batch": {"stage1": 8, "stage2": 4}, "learning_rate": {"stage1": 1e-3, "stage2": 1e-4}, "stage2_mode": "full",
        "data_sizes": {"stage1_train_records": 10, "stage1_heldout_records": 5, "stage2_instruct_records": 7,
                       "question_units": {"pope": 40, "gqa": 30}, "max_questions": 0},
        "versions": {"torch": "x"}, "git": {"commit": "abc", "dirty": True}, "jobs": 1, "threads_per_job": 2,
        "wall_seconds": {"stage1_mean_per_cell": 1.5, "stage2_mean_per_cell": 2.5, "bench_mean_per_cell": 3.5,
                         "cells_sum": 45.0, "span": 40.0, "this_invocation": 50.0},
        "alignment": {"joint": {"mean": {"i2t@1": 0.25, "t2i@1": 0.125, "modality_gap": 0.5, "ntp_loss": 2.0}}},
        "scores": {"ntp_only": {"1": {"pope": {"headline": 41.25}, "gqa": {"headline": 30.0}},
                                "0": {"pope": {"headline": 40.0}}}},
        "comparisons": [c],
    }


def test_markdown_and_figure_render_from_report_json(tmp_path):
    r = json.loads(json.dumps(fake_report(tmp_path)))  # exactly what report.json holds
    md = R.render_markdown(r)
    c = r["comparisons"][0]
    avg = c["diff"]["average"]
    assert f"{avg['estimate']:+.1f} [{avg['low']:+.1f}, {avg['high']:+.1f}]" in md
    for b in ("pope", "gqa"):
        assert f"| {b} | {c['n_units'][b]} | {c['score_a'][b]['estimate']:.1f} [" in md
    assert "| joint | 0.2500 | 0.1250 | 0.5000 | 2.0000 |" in md
    scores = md.split("## Scores per arm and seed")[1].split("\n## ")[0]  # every finished chain, seeds in order
    assert "| ntp_only | 0 | 40.0 | - |\n| ntp_only | 1 | 41.2 | 30.0 |" in scores
    assert "all cells 45 s of work; first cell start to last cell end 40 s" in md
    assert R.plot_report(r, tmp_path / "report.png") and (tmp_path / "report.png").stat().st_size > 1000
    assert "## Every arm against" not in md  # one comparison: no summary table


def test_summary_table_lists_every_arm_against_the_baseline(tmp_path):
    r = json.loads(json.dumps(fake_report(tmp_path)))
    second = json.loads(json.dumps(r["comparisons"][0]))
    second["arm_b"] = "w1"
    second["diff"]["average"] = {"estimate": -1.25, "low": -2.5, "high": 0.5}
    r["comparisons"].append(second)
    md = R.render_markdown(r)
    d = r["comparisons"][0]["diff"]
    row = "| joint | " + " | ".join(f"{d[x]['estimate']:+.1f} [{d[x]['low']:+.1f}, {d[x]['high']:+.1f}]"
                                    for x in (*r["comparisons"][0]["benchmarks"], "average")) + " |"
    assert "## Every arm against ntp_only" in md and "| arm | gqa | pope | **average** |" in md and row in md
    summary = md.split("## Every arm against ntp_only")[1].split("\n## ")[0]
    assert summary.count("| w1 | ") == 1 and summary.count("| joint | ") == 1 and "-1.2 [-2.5, +0.5] |" in summary


@pytest.mark.slow
def test_smoke_end_to_end_and_resume(tiny_assets, tmp_path, capsys):
    """1 seed x 2 arms, a few steps per stage, a few questions per benchmark; then the same command
    reuses every cell, and a changed stage-2 setting is refused."""
    import time

    out = tmp_path / "repro"
    argv = ["--output_dir", str(out), "--assets_root", str(tiny_assets.root), "--seeds", "0",
            "--stage1_steps", "3", "--stage1_batch", "8", "--stage2_steps", "3", "--stage2_batch", "4",
            "--max_questions", "12", "--alignment_samples", "64", "--vqa_batch", "12",
            "--vqa_extra", "--max_new_tokens 6", "--bootstrap_draws", "200", "--jobs", "2"]
    t0 = time.time()
    report = R.run(argv)
    first = time.time() - t0
    assert [c["stage"] for c in report["cells"] if not c["reused"]].count("bench") == 2
    (c,) = report["comparisons"]
    assert (c["arm_a"], c["arm_b"]) == ("ntp_only", "joint") and c["seeds"] == [0]
    assert c["benchmarks"] == sorted(R.BENCHMARKS)
    for b in c["benchmarks"]:
        assert 0 <= c["score_a"][b]["estimate"] <= 100 and c["diff"][b]["low"] <= c["diff"][b]["high"]
        assert report["scores"]["joint"]["0"][b]["headline"] == pytest.approx(c["score_b"][b]["estimate"])
    assert set(report["alignment"]) == {"ntp_only", "joint"}
    assert report["steps"] == {"stage1": 3, "stage2": 3} and report["git"]["commit"]
    on_disk = json.loads((out / "report.json").read_text())
    assert (out / "report.md").read_text() == R.render_markdown(on_disk)
    assert (out / "report.png").stat().st_size > 1000
    stage2 = out / "cells/joint/seed0/stage2/llava-joint-seed0-full"
    assert (stage2 / "config.json").is_file()
    # rerun: every cell reused, the same numbers
    t0 = time.time()
    again = R.run(argv)
    assert all(c["reused"] for c in again["cells"]) and len(again["cells"]) == 6
    assert again["comparisons"] == report["comparisons"]
    assert time.time() - t0 < first / 2
    # the archive (no models), copied back into an emptied output directory (a new machine): every
    # cell reused, the same report (the cells' settings name their absolute paths: same --output_dir)
    import shutil

    archive = tmp_path / "archive"
    R.run([*argv, "--report_only", "--archive", str(archive)])
    assert not list(archive.rglob("*.bin")) and not list(archive.rglob("*.safetensors"))
    shutil.rmtree(out)
    shutil.copytree(archive, out)
    restored = R.run(argv)
    assert all(c["reused"] for c in restored["cells"]) and len(restored["cells"]) == 6
    assert restored["comparisons"] == report["comparisons"] and restored["alignment"] == report["alignment"]
    # a changed setting of finished cells is refused before any work (exit 2)
    capsys.readouterr()
    assert R.main([*argv, "--stage2_steps", "4"]) == 2
    err = capsys.readouterr().err
    assert "joint/seed0/stage2" in err and "--max_steps 3 -> 4" in err and "--force" in err


def test_units_reproduce_each_scorers_primary(tmp_path):
    """The bootstrap's units give exactly the scorer's primary number (POPE macro F1, MME (acc+acc+)/2)."""
    from llava_contrastive.evaluation import scoring as S

    # POPE: two categories; labels in coco files as the benchmark writes them
    coco = tmp_path / "pope" / "coco"
    coco.mkdir(parents=True)
    gt = [("1", "random", "yes"), ("2", "random", "no"), ("3", "random", "yes"), ("4", "popular", "no"),
          ("5", "popular", "yes"), ("6", "popular", "yes")]
    for cat in ("random", "popular", "adversarial"):
        (coco / f"coco_pope_{cat}.json").write_text(
            "".join(json.dumps({"question_id": int(q), "label": y}) + "\n" for q, c, y in gt if c == cat))
    answers = {"1": "Yes", "2": "Yes.", "3": "No", "4": "No", "5": "Yes", "6": "no"}
    sc = {**S.score_pope(gt, answers), "bench_dir": str(tmp_path), "split": "test"}
    # random: tp1 fp1 fn1 -> F1 0.5; popular: tp1 tn1 fn1 -> P 1, R 0.5, F1 2/3; primary 100 * (0.5 + 2/3) / 2
    assert sc["primary"] == pytest.approx(100 * (0.5 + 2 / 3) / 2)
    assert R.units_from_score("pope", sc).score() == pytest.approx(sc["primary"])
    # MME: per category (acc + acc+) / 2
    mgt = [("1", "count", "p1", "yes"), ("2", "count", "p1", "no"), ("3", "count", "p2", "yes"),
           ("4", "count", "p2", "no"), ("5", "color", "p3", "yes"), ("6", "color", "p3", "no")]
    sc = S.score_mme(mgt, {"1": "yes", "2": "no", "3": "yes", "4": "yes", "5": "no", "6": "no"})
    # count: acc 3/4, acc+ 1/2 -> 62.5; color: acc 1/2, acc+ 0 -> 25; primary 43.75
    assert sc["primary"] == pytest.approx(43.75)
    u = R.units_from_score("mme", sc)
    assert len(u.ids) == 3 and u.score() == pytest.approx(43.75)
    sc = S.score_exact([("a", "x", "two"), ("b", "x", "red")], {"a": "2", "b": "blue"})
    assert R.units_from_score("gqa", sc).score() == pytest.approx(50.0)


def test_question_subsets_keep_whole_groups_over_categories():
    qs = ([{"question_id": i, "category": "existence"} for i in range(6)]
          + [{"question_id": 10 + i, "category": "count"} for i in range(6)])
    pair_of = {str(q["question_id"]): str(q["question_id"] // 2) for q in qs}  # pairs (0,1) (2,3) ...
    sub = R.subset_questions("mme", qs, 5, pair_of)
    # round robin over categories, whole pairs: (0,1) (10,11) (2,3) -> 6 questions
    assert [q["question_id"] for q in sub] == [0, 1, 2, 3, 10, 11]
    off = 1_000_000
    mm = [{"question_id": b + k * off, "category": "count"} for b in (1, 2) for k in range(4)]
    sub = R.subset_questions("mmbench", mm, 2, {})
    assert sorted(q["question_id"] for q in sub) == [1, 1 + off, 1 + 2 * off, 1 + 3 * off]


def test_split_answers_restores_each_benchmarks_ids(tmp_path):
    recs = [{"question_id": R.combined_id("pope", 3), "prompt": "p", "text": "Yes", "answer_id": "a", "model_id": "m",
             "metadata": {}},
            {"question_id": R.combined_id("gqa", "201"), "prompt": "p", "text": "red", "answer_id": "b", "model_id": "m",
             "metadata": {}},
            {"question_id": R.combined_id("gqa", "2|x"), "prompt": "p", "text": "2", "answer_id": "c", "model_id": "m",
             "metadata": {}}]
    (tmp_path / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert R.split_answers(str(tmp_path / "all.jsonl"), str(tmp_path), "test") == {"pope": 1, "gqa": 2}
    pope = [json.loads(x) for x in (tmp_path / "pope_test_answers.jsonl").read_text().splitlines()]
    gqa = [json.loads(x) for x in (tmp_path / "gqa_test_answers.jsonl").read_text().splitlines()]
    assert pope[0]["question_id"] == 3 and pope[0]["text"] == "Yes" and set(pope[0]) == set(recs[0])
    assert [g["question_id"] for g in gqa] == ["201", "2|x"]


def test_settings_diff_names_the_changed_flag():
    old = {"commands": [["python", "-m", "x", "--max_steps", "3", "--seed", "0"]], "tier": "tiny"}
    new = {"commands": [["python", "-m", "x", "--max_steps", "4", "--seed", "0"]], "tier": "small"}
    assert R.settings_diff(old, new) == ["--max_steps 3 -> 4", "tier: 'tiny' -> 'small'"]


def fake_assets(root: Path) -> "R.Assets":
    return R.Assets("tiny", root, root / "llm", root / "vision", root / "pre.json", root / "img", root / "held.json",
                    root / "mix.json", root / "data", root / "eval")


def test_plan_stage2_is_identical_across_arms_and_seeded(tmp_path):
    a = R.parse_args(["--output_dir", str(tmp_path / "o"), "--seeds", "3", "7", "--arm", 'w1="--contrastive_weight 1"'])
    arms = R.select_arms(a)
    assert arms == {"ntp_only": ["--contrastive_weight", "0"], "joint": [], "w1": ["--contrastive_weight", "1"]}
    chains = R.plan(a, fake_assets(tmp_path), arms)
    assert [(ch[0].arm, ch[0].seed) for ch in chains] == [(n, s) for s in (3, 7) for n in arms]
    for seed in (3, 7):
        s2 = {ch[1].arm: ch[1].commands[0] for ch in chains if ch[1].seed == seed}
        norm = {arm: [t.replace(f"/{arm}/", "/ARM/").replace(f"llava-{arm}-", "llava-ARM-") for t in cmd]
                for arm, cmd in s2.items()}
        assert norm["joint"] == norm["ntp_only"] == norm["w1"]  # stage 2: only the projector path differs
        cmd = s2["joint"]
        assert cmd[cmd.index("--seed") + 1] == str(seed) and cmd[cmd.index("--contrastive_weight") + 1] == "0"
        assert cmd[cmd.index("--pretrain_mm_mlp_adapter") + 1].endswith(f"joint/seed{seed}/stage1/mm_projector.bin")
        assert "--lora_enable" not in cmd
    s1 = {ch[0].arm: ch[0].commands[0] for ch in chains if ch[0].seed == 3}
    assert s1["w1"][-2:] == ["--contrastive_weight", "1"] and s1["w1"][s1["w1"].index("--seed") + 1] == "3"
    assert "--contrastive_weight" not in s1["joint"]
    # stage-2 cells depend on their stage-1 settings: another stage-1 flag changes the stage-2 hash
    b = R.parse_args(["--output_dir", str(tmp_path / "o"), "--seeds", "3", "7", "--stage1_steps", "9"])
    other = R.plan(b, fake_assets(tmp_path), R.select_arms(b))
    assert other[0][1].commands == chains[0][1].commands and other[0][1].settings_hash() != chains[0][1].settings_hash()
    # LoRA: stage 2 with LoRA flags into its own cells, VQA with the base LLM
    c = R.parse_args(["--output_dir", str(tmp_path / "o"), "--seeds", "3", "--stage2", "lora"])
    lora = R.plan(c, fake_assets(tmp_path), R.select_arms(c))[0]
    assert "--lora_enable" in lora[1].commands[0] and lora[1].dir.name == "stage2-lora"
    vqa = lora[2].commands[0]
    assert vqa[vqa.index("--model-base") + 1] == str(tmp_path / "llm") and "lora" in vqa[vqa.index("--model-path") + 1]


def test_cost_line_names_the_cells_parallelism_not_the_reporting_call():
    assert R._parallelism({"jobs": 2, "threads_per_job": ["1"]}) == " with 2 job(s) x 1 thread(s)"
    assert R._parallelism({"jobs": None, "threads_per_job": ["1"]}) == " with ? job(s) x 1 thread(s)"
    assert R._parallelism({"jobs": None, "threads_per_job": None}) == ""
    assert R._parallelism({"jobs": 1, "threads_per_job": 2}) == " with 1 job(s) x 2 thread(s)"  # older reports
