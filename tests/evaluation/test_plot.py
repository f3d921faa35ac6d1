"""Training curves from trainer_state.json alone: the panels hold exactly the logged values, NTP loss
on its own axis, the learning rate drawn, titles naming the runs, checkpoint-N fallback, user errors,
and the ``plot`` verb writing a PNG."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llava_contrastive import cli
from llava_contrastive.evaluation import alignment
from llava_contrastive.evaluation import plot as P

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# a joint run: NTP moves 0.70 -> 0.68 while the contrastive loss falls from 3.2 to 2.0
STEPS = [1, 2, 3, 4, 5]
NTP = [0.70, 0.695, 0.69, 0.685, 0.68]
CON = [3.2, 2.9, 2.5, 2.2, 2.0]
LR = [2e-4, 4e-4, 1e-3, 7e-4, 1e-4]
SCALE = [14.29, 14.5, 15.1, 15.9, 16.4]
I2T = [0.25, 0.5, 0.5, 0.75, 1.0]
T2I = [0.25, 0.25, 0.5, 0.75, 0.75]
# an NTP-only run: logs `loss` only (no ntp_loss, no contrastive keys)
BASE_LOSS = [0.71, 0.70, 0.695, 0.69, 0.688]
BASE_LR = [1e-4, 2e-4, 3e-4, 2e-4, 1e-4]


def joint_history() -> list:
    hist = [{"step": s, "epoch": s / 5, "loss": n + 0.5 * c, "ntp_loss": n, "contrastive_loss": c,
             "learning_rate": lr, "logit_scale": ls, "i2t_acc": a, "t2i_acc": b, "grad_norm": 1.0}
            for s, n, c, lr, ls, a, b in zip(STEPS, NTP, CON, LR, SCALE, I2T, T2I)]
    return hist + [{"step": 5, "epoch": 1.0, "train_runtime": 12.5, "train_loss": 2.0}]  # the summary entry


def base_history() -> list:
    return [{"step": s, "epoch": s / 5, "loss": v, "learning_rate": lr}
            for s, v, lr in zip(STEPS, BASE_LOSS, BASE_LR)]


def write_state(directory: Path, history: list) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "trainer_state.json"
    path.write_text(json.dumps({"global_step": STEPS[-1], "log_history": history}))
    return path


def panels(fig) -> dict:
    return {ax.get_title(): ax for ax in fig.axes}


def lines(ax) -> dict:
    return {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()}


def test_run_curves_hold_the_logged_values_on_separate_axes(tmp_path):
    state = write_state(tmp_path / "joint-w0.5", joint_history())
    fig = alignment.training_curves_figure(state)
    axes = panels(fig)
    assert set(axes) == {"NTP loss", "contrastive loss", "learning rate", "logit scale", "in-batch accuracy"}
    assert lines(axes["NTP loss"]) == {"ntp_loss": (STEPS, NTP)}
    assert lines(axes["contrastive loss"]) == {"contrastive_loss": (STEPS, CON)}
    assert lines(axes["learning rate"]) == {"learning_rate": (STEPS, LR)}
    assert lines(axes["logit scale"]) == {"logit_scale": (STEPS, SCALE)}
    assert lines(axes["in-batch accuracy"]) == {"i2t_acc": (STEPS, I2T), "t2i_acc": (STEPS, T2I)}
    # NTP's own y-range: brackets 0.68..0.70 and nothing else (a 0.02 change fills the panel)
    lo, hi = axes["NTP loss"].get_ylim()
    assert lo <= min(NTP) and hi >= max(NTP)
    assert hi - lo < 2 * (max(NTP) - min(NTP)) and hi < min(CON)
    lo_c, hi_c = axes["contrastive loss"].get_ylim()
    assert lo_c <= min(CON) and hi_c >= max(CON) and lo_c > max(NTP)
    assert not axes["NTP loss"].get_shared_y_axes().joined(axes["NTP loss"], axes["contrastive loss"])
    assert fig.get_suptitle() == "Training curves: joint-w0.5 (5 logged steps)"


def test_training_curves_png_title_names_the_run_and_ntp_only_runs_draw_loss(tmp_path):
    state = write_state(tmp_path / "out" / "checkpoint-5", base_history())
    fig = alignment.training_curves_figure(state)
    assert fig.get_suptitle() == "Training curves: out/checkpoint-5 (5 logged steps)"
    axes = panels(fig)
    assert set(axes) == {"NTP loss", "learning rate"}  # nothing contrastive logged: no empty panels
    assert lines(axes["NTP loss"]) == {"loss (no ntp_loss logged)": (STEPS, BASE_LOSS)}
    png = tmp_path / "curves.png"
    assert alignment.plot_training_curves(state, png, title="my-run")
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert alignment.training_curves_figure(state, title="my-run").get_suptitle().startswith("Training curves: my-run ")
    empty = write_state(tmp_path / "empty", [{"step": 0, "train_runtime": 1.0}])
    assert not alignment.plot_training_curves(empty, tmp_path / "none.png") and not (tmp_path / "none.png").exists()


def test_evaluation_figures_name_the_run(tmp_path):
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(12, 8, generator=g), torch.randn(12, 8, generator=g)
    name = alignment.run_name(tmp_path / "runs" / "joint", None)
    assert name == "joint"
    assert alignment.run_name(tmp_path / "joint" / "checkpoint-40", None) == "joint/checkpoint-40"
    assert alignment.run_name(None, str(tmp_path / "eval-out")) == "eval-out"
    fig = alignment.plot_similarity_hist(img, txt, tmp_path / "h.png", title=name)
    assert fig.get_suptitle() == "joint" and (tmp_path / "h.png").read_bytes()[:8] == PNG_MAGIC
    fig = alignment.plot_projection(img, txt, 0.5, tmp_path / "p.png", title=name)
    assert fig.get_suptitle() == "joint" and (tmp_path / "p.png").read_bytes()[:8] == PNG_MAGIC


def test_several_runs_overlaid_one_panel_per_key(tmp_path):
    runs = [P.load_run(write_state(tmp_path / "joint", joint_history()).parent),
            P.load_run(write_state(tmp_path / "base", base_history()), label="ntp-only")]
    assert [r.label for r in runs] == ["joint", "ntp-only"]
    fig = P.draw(runs, [(P.TITLES[k], (k,)) for k in P.DEFAULT_KEYS], P.compare_title(runs))
    assert fig.get_suptitle() == "Training curves: joint, ntp-only"
    axes = panels(fig)
    assert lines(axes["NTP loss"]) == {"joint": (STEPS, NTP), "ntp-only loss (no ntp_loss logged)": (STEPS, BASE_LOSS)}
    assert lines(axes["contrastive loss"]) == {"joint": (STEPS, CON)}
    assert lines(axes["learning rate"]) == {"joint": (STEPS, LR), "ntp-only": (STEPS, BASE_LR)}
    # a run keeps its colour in every panel; every panel has a legend
    assert axes["NTP loss"].get_lines()[0].get_color() == axes["learning rate"].get_lines()[0].get_color()
    assert axes["NTP loss"].get_lines()[1].get_color() != axes["NTP loss"].get_lines()[0].get_color()
    assert all(ax.get_legend() is not None for ax in fig.axes)


def test_checkpoint_fallback_takes_the_highest_step(tmp_path):
    run = tmp_path / "run"
    write_state(run / "checkpoint-2", base_history()[:2])
    write_state(run / "checkpoint-10", base_history())  # 10 > 2 although "checkpoint-10" < "checkpoint-2"
    (run / "checkpoint-20").mkdir()  # no trainer_state.json: skipped
    assert P.find_state(run) == run / "checkpoint-10" / "trainer_state.json"
    loaded = P.load_run(run)
    assert loaded.label == "run/checkpoint-10" and len(loaded.logs) == 5
    write_state(run, joint_history())  # the top-level file wins when present
    assert P.find_state(run) == run / "trainer_state.json"
    assert P.find_state(run / "checkpoint-2" / "trainer_state.json") == run / "checkpoint-2" / "trainer_state.json"


def test_missing_trainer_state_exits_2_with_one_line(tmp_path, capsys):
    empty = tmp_path / "no-run"
    empty.mkdir()
    assert P.main([str(empty), "--output", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{empty}: no trainer_state.json" in err and "checkpoint-N/trainer_state.json" in err
    assert P.main([str(tmp_path / "absent"), "--output", str(tmp_path / "c.png")]) == 2
    assert f"{tmp_path / 'absent'}: not found" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()


def test_bad_keys_labels_and_unreadable_state_are_user_errors(tmp_path, capsys):
    run = write_state(tmp_path / "joint", joint_history()).parent
    assert P.main([str(run), "--output", str(tmp_path / "c.png"), "--keys", "ntp_loss", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--keys nope: logged by none of the runs" in err and "contrastive_loss" in err
    assert P.main([str(run), "--output", str(tmp_path / "c.png"), "--labels", "a", "b"]) == 2
    assert "2 label(s) for 1 run(s)" in capsys.readouterr().err
    bad = tmp_path / "bad" / "trainer_state.json"
    bad.parent.mkdir()
    bad.write_text("{not json")
    assert P.main([str(bad.parent), "--output", str(tmp_path / "c.png")]) == 2
    assert "not a readable trainer_state.json" in capsys.readouterr().err


def test_plot_verb_writes_the_png(tmp_path, capsys):
    a = write_state(tmp_path / "joint", joint_history()).parent
    b = write_state(tmp_path / "base" / "checkpoint-5", base_history()).parent.parent
    out = tmp_path / "figs" / "curves.png"
    assert cli.main(["plot", str(a), str(b), "--output", str(out), "--labels", "w0.5", "w0",
                     "--keys", "ntp_loss", "logit_scale", "learning_rate"]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert "w0.5, w0" in capsys.readouterr().out
    res = P.run([str(a), str(b), "--output", str(tmp_path / "d.png")])
    assert res["keys"] == list(P.DEFAULT_KEYS) and [r["label"] for r in res["runs"]] == ["joint", "base/checkpoint-5"]


def test_plot_verb_from_the_command_line(tmp_path):
    run = write_state(tmp_path / "joint", joint_history()).parent
    out = tmp_path / "curves.png"
    proc = subprocess.run([sys.executable, "-m", "llava_contrastive", "plot", str(run), "--output", str(out)],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.read_bytes()[:8] == PNG_MAGIC
    help_out = subprocess.run([sys.executable, "-m", "llava_contrastive", "--help"], capture_output=True, text=True,
                              timeout=120)
    assert "  plot " in help_out.stdout
    missing = subprocess.run([sys.executable, "-m", "llava_contrastive", "plot", str(tmp_path / "x"), "--output",
                              str(out)], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr and missing.stderr.count("\n") == 1


def test_finish_report_writes_titled_curves_for_the_run(tmp_path, monkeypatch):
    from llava_contrastive.core.config import ContrastiveArguments

    titles = {}
    for fn in ("plot_similarity_hist", "plot_projection", "training_curves_figure"):
        real = getattr(alignment, fn)

        def spy(*args, _real=real, _fn=fn, **kw):  # the real drawing, its title recorded
            fig = _real(*args, **kw)
            titles[_fn] = fig.get_suptitle()
            return fig

        monkeypatch.setattr(alignment, fn, spy)
    run = write_state(tmp_path / "joint-run", joint_history()).parent
    g = torch.Generator().manual_seed(0)
    emb = alignment.Embedded(image=torch.randn(10, 8, generator=g), text=torch.randn(10, 8, generator=g), keys=None,
                             ntp_loss=0.7, ntp_tokens=100, records=10)
    report = alignment.finish_report(emb, ContrastiveArguments(), {}, {}, run_dir=run, trainer_state=None,
                                     output_dir=str(tmp_path / "eval"), figures=True, t0=0.0)
    figs = report["paths"]["figures"]
    assert set(figs) == {"similarity_hist", "embedding_projection", "training_curves"}
    assert all(Path(f).read_bytes()[:8] == PNG_MAGIC for f in figs.values())
    assert report["paths"]["trainer_state"] == str(run / "trainer_state.json")
    assert report["train_final_ntp_loss"] == pytest.approx(sum(NTP) / len(NTP))
    assert titles == {"plot_similarity_hist": "joint-run", "plot_projection": "joint-run",
                      "training_curves_figure": "Training curves: joint-run (5 logged steps)"}
