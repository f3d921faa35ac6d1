"""Held-out image-text alignment, host-agnostic: embeddings -> metrics, figures and ``report.json``.

Works for any upstream-format ``mm_projector.bin`` (ours, or one trained by upstream's NTP-only
recipe): the base LLM and vision tower are loaded as upstream's stage 1 does, the projector is
loaded from the file, and the pair embeddings are the ones the contrastive term scores
(``ContrastiveLlavaForCausalLM.embed_pairs``; flags ``--contrastive_*`` choose them, defaulting to
the run's ``contrastive_config.json`` when a run directory is given).

Outputs in ``--output_dir``: ``report.json`` (metrics, settings, paths), ``similarity_hist.png``,
``embedding_projection.png`` and, when the run's ``trainer_state.json`` is found,
``training_curves.png`` (drawn by ``evaluation/plot.py``); each figure's title names the run.
``evaluate(...)`` is the programmatic entry point.

Each host supplies the model and the data (``hosts/llava/eval.py``: ``llava-contrastive eval``;
``hosts/hf/eval.py``: ``llava-contrastive eval --host hf``); nothing here imports a host package.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, Optional

from llava_contrastive.core.config import ContrastiveArguments
from llava_contrastive.evaluation import plot as curves
from llava_contrastive.evaluation.provenance import compare_with_baseline, load_report, provenance
from llava_contrastive.training.checkpointing import (HEAD_CONFIG_FILE, HEAD_FILE, PROJECTOR_FILE, checkpoint_dirs,
                                                      last_complete_checkpoint)

IGNORE_INDEX = -100  # label of unsupervised positions (upstream's constants.IGNORE_INDEX, transformers')
REPORT_KEYS = ("i2t@1", "i2t@5", "i2t@10", "t2i@1", "t2i@5", "t2i@10", "pos_mean", "neg_mean",
               "acc_i2t", "acc_t2i", "modality_gap", "ntp_loss", "n", "chance")
# flags of ContrastiveArguments that define the evaluated embeddings (the rest only shape training)
EMBEDDING_FLAGS = ("contrastive_loss", "contrastive_text_source", "contrastive_prompt", "contrastive_text_layer",
                   "contrastive_text_pooling", "contrastive_image_source", "contrastive_image_layer",
                   "contrastive_image_pooling", "contrastive_head", "contrastive_head_dim",
                   "contrastive_mask_duplicates")


# ---- projector files -----------------------------------------------------------------------------
def resolve_projector(projector: str) -> tuple[Path, Optional[Path]]:
    """(projector file, run directory or None) from a file or a stage-1 output directory."""
    p = Path(projector)
    if p.is_dir():
        f = p / PROJECTOR_FILE
        if not f.is_file():
            ckpts = [c for c in checkpoint_dirs(str(p)) if os.path.isfile(os.path.join(c, PROJECTOR_FILE))]
            if not ckpts:
                raise FileNotFoundError(f"{p}: no {PROJECTOR_FILE} (nor checkpoint-*/{PROJECTOR_FILE})")
            f = Path(ckpts[-1]) / PROJECTOR_FILE
        return f, f.parent
    if not p.is_file():
        raise FileNotFoundError(f"{p}: projector file not found")
    return p, p.parent


def projector_weights(state: Dict[str, Any]) -> Dict[str, Any]:
    """The ``mm_projector`` sub-state with module-relative keys (as upstream's get_w does)."""
    out = {k.split("mm_projector.", 1)[1]: v for k, v in state.items() if "mm_projector." in k}
    if not out:
        raise ValueError(f"no mm_projector weights among keys {sorted(state)[:6]}")
    return out


def infer_projector_type(state: Dict[str, Any], run_dir: Optional[Path] = None) -> str:
    """linear | mlpNx_gelu from the key shapes (``config.json`` beside the file breaks ties)."""
    if run_dir is not None and (run_dir / "config.json").is_file():
        try:
            saved = json.loads((run_dir / "config.json").read_text()).get("mm_projector_type")
        except (OSError, ValueError):
            saved = None
        if saved:
            return saved
    weights = projector_weights(state)
    if "weight" in weights and "bias" in weights:
        return "linear"
    indices = sorted({int(k.split(".")[0]) for k in weights if k.split(".")[0].isdigit() and k.endswith("weight")})
    if indices and indices == list(range(0, 2 * len(indices), 2)):
        return f"mlp{len(indices)}x_gelu"
    raise ValueError(f"cannot infer the projector type from keys {sorted(weights)}; pass --mm_projector_type")


# ---- model and data ------------------------------------------------------------------------------
def contrastive_settings(run_dir: Optional[Path], overrides: Optional[Dict[str, Any]] = None) -> ContrastiveArguments:
    """The run's embedding settings (contrastive_config.json) with explicit overrides on top."""
    base: Dict[str, Any] = {}
    if run_dir is not None and (run_dir / HEAD_CONFIG_FILE).is_file():
        saved = json.loads((run_dir / HEAD_CONFIG_FILE).read_text())
        base = {k: saved[k] for k in saved if k in {f.name for f in dataclasses.fields(ContrastiveArguments)}}
    base.update({k: v for k, v in (overrides or {}).items() if v is not None})
    # evaluation never trains: the weight only has to make the settings valid; the queue is irrelevant
    base["contrastive_queue_size"] = 0
    args = ContrastiveArguments(**base)
    args.validate()
    return args


def settings_and_head(run_dir: Optional[Path], head: Optional[str], contrastive: Optional[Dict[str, Any]]
                      ) -> tuple[ContrastiveArguments, Optional[Path]]:
    """(embedding settings, directory of the trained head that applies to them or None): ``--head`` or
    the run's head, the settings saved beside it (else the run's), ``contrastive`` overrides on top."""
    head_dir = Path(head) if head else (run_dir if run_dir is not None and (run_dir / HEAD_FILE).is_file() else None)
    settings_dir = head_dir if head_dir is not None and (head_dir / HEAD_CONFIG_FILE).is_file() else run_dir
    cargs = contrastive_settings(settings_dir, contrastive)
    if head_dir is not None and (head_dir / HEAD_CONFIG_FILE).is_file():
        saved = json.loads((head_dir / HEAD_CONFIG_FILE).read_text())
        if any(saved.get(k) != getattr(cargs, k) for k in ("contrastive_loss", "contrastive_head", "contrastive_head_dim")):
            head_dir = None  # embeddings overridden to another head shape: the trained head does not apply
    if cargs.contrastive_weight <= 0:
        cargs = dataclasses.replace(cargs, contrastive_weight=1.0)  # settings only; nothing is trained here
    return cargs, head_dir


@dataclasses.dataclass
class Embedded:
    image: Any  # [n, D] float32
    text: Any
    keys: Optional[Any]  # [n] int64 caption keys (None when duplicates are not masked)
    ntp_loss: float  # token-weighted mean over the evaluated records
    ntp_tokens: int
    records: int


def embed_dataset(model, dataset, collator, batch_size: int = 64, progress: bool = True,
                  image_key: str = "images") -> Embedded:
    """``model.embed_pairs(input_ids, attention_mask, labels, batch[image_key])`` over the dataset
    (either host's model: upstream batches carry ``images``, native ones ``pixel_values``)."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator, num_workers=0)
    images, texts, keys = [], [], []
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for batch in tqdm(loader, desc="eval", disable=not progress, dynamic_ncols=True):
            img, txt, k, _rows, loss = model.embed_pairs(batch["input_ids"], batch["attention_mask"],
                                                         batch["labels"], batch[image_key])
            n_tok = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # predicted tokens (shifted)
            if loss is not None and n_tok > 0 and math.isfinite(float(loss)):
                loss_sum += float(loss) * n_tok
                tokens += n_tok
            images.append(img.float().cpu())
            texts.append(txt.float().cpu())
            if k is not None:
                keys.append(k.cpu())
    return Embedded(image=torch.cat(images), text=torch.cat(texts), keys=torch.cat(keys) if keys else None,
                    ntp_loss=loss_sum / tokens if tokens else float("nan"), ntp_tokens=tokens,
                    records=len(dataset))


def metrics_from_embeddings(emb: Embedded) -> Dict[str, float]:
    from llava_contrastive.core.metrics import alignment_report

    report = alignment_report(emb.image, emb.text, ks=(1, 5, 10), duplicate_keys=emb.keys)
    report["ntp_loss"] = emb.ntp_loss
    report["chance"] = 1.0 / max(1, emb.image.shape[0])
    return report


# ---- figures -------------------------------------------------------------------------------------
_plt = curves._plt  # matplotlib's pyplot on the Agg backend


def run_name(run_dir: Optional[Path], output_dir: Optional[str] = None) -> str:
    """What the figures' titles call the run: its directory (``run/checkpoint-N`` for a checkpoint),
    else the evaluation's output directory."""
    if run_dir is not None:
        return curves.dir_label(Path(run_dir))
    return curves.dir_label(Path(output_dir)) if output_dir else "run"


def plot_similarity_hist(image, text, path: Path, max_negatives: int = 200_000, seed: int = 0,
                         title: Optional[str] = None):
    """Histogram of positive vs negative pair cosines, saved to ``path``; returns the Figure."""
    import torch
    import torch.nn.functional as F

    plt = _plt()
    img, txt = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
    n = img.shape[0]
    pos = (img * txt).sum(-1).numpy()
    g = torch.Generator().manual_seed(seed)
    m = min(max_negatives, n * (n - 1))
    i = torch.randint(0, n, (m,), generator=g)
    j = (i + torch.randint(1, max(2, n), (m,), generator=g)) % n  # j != i
    neg = (img[i] * txt[j]).sum(-1).numpy()
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = 60
    ax.hist(neg, bins=bins, density=True, alpha=0.55, label=f"negative pairs (mean {neg.mean():.3f})")
    ax.hist(pos, bins=bins, density=True, alpha=0.55, label=f"positive pairs (mean {pos.mean():.3f})")
    ax.set_xlabel("cosine similarity (image, text)")
    ax.set_ylabel("density")
    ax.set_title(f"Held-out image-text cosine, n={n}")
    ax.legend()
    fig.tight_layout()
    return curves.save(fig, path, title)


def plot_projection(image, text, gap: float, path: Path, max_points: int = 2000, title: Optional[str] = None):
    """2-D PCA of both modalities' normalised embeddings, saved to ``path``; returns the Figure."""
    import torch
    import torch.nn.functional as F

    plt = _plt()
    img, txt = F.normalize(image.float(), dim=-1)[:max_points], F.normalize(text.float(), dim=-1)[:max_points]
    both = torch.cat([img, txt])
    centred = both - both.mean(0, keepdim=True)
    _u, _s, v = torch.linalg.svd(centred, full_matrices=False)
    xy = (centred @ v[:2].T).numpy()
    k = img.shape[0]
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.scatter(xy[:k, 0], xy[:k, 1], s=6, alpha=0.5, label="image embeddings")
    ax.scatter(xy[k:, 0], xy[k:, 1], s=6, alpha=0.5, label="text (caption) embeddings")
    ci, ct = xy[:k].mean(0), xy[k:].mean(0)
    ax.annotate("", xy=ct, xytext=ci, arrowprops=dict(arrowstyle="->", color="black", lw=1.5))
    ax.scatter([ci[0], ct[0]], [ci[1], ct[1]], marker="x", c="black", s=60, label="modality centres")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(f"PCA of normalised embeddings, modality gap = {gap:.3f}")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return curves.save(fig, path, title)


def load_log_history(trainer_state: Path) -> list:
    return [h for h in json.loads(Path(trainer_state).read_text()).get("log_history", []) if "step" in h]


def training_curves_figure(trainer_state: Path, title: Optional[str] = None):
    """The Figure of ``training_curves.png`` (None when nothing is logged): NTP loss, contrastive loss,
    learning rate, logit scale, in-batch accuracy, each panel on its own y-axis (evaluation/plot.py);
    the title names the run (``title``, default the trainer_state's directory)."""
    run = curves.Run(title or curves.dir_label(Path(trainer_state).parent), Path(trainer_state),
                     load_log_history(trainer_state))
    steps = sum(1 for h in run.logs if "loss" in h)
    return curves.draw([run], curves.RUN_PANELS, f"Training curves: {run.label} ({steps} logged steps)")


def plot_training_curves(trainer_state: Path, path: Path, title: Optional[str] = None) -> bool:
    """``training_curves_figure`` saved to ``path``; False (nothing written) when nothing is logged."""
    fig = training_curves_figure(trainer_state, title)
    if fig is None:
        return False
    curves.save(fig, path)
    return True


def find_trainer_state(run_dir: Optional[Path]) -> Optional[Path]:
    if run_dir is None:
        return None
    if (run_dir / "trainer_state.json").is_file():
        return run_dir / "trainer_state.json"
    last = last_complete_checkpoint(str(run_dir))
    return Path(last) / "trainer_state.json" if last else None


def train_summary(trainer_state: Optional[Path]) -> Dict[str, Any]:
    """Final train NTP loss (mean of the last 10 logged steps), steps, runtime, s/step."""
    if trainer_state is None or not Path(trainer_state).is_file():
        return {}
    hist = load_log_history(trainer_state)
    logs = [h for h in hist if "loss" in h]
    out: Dict[str, Any] = {"train_steps": max((h["step"] for h in hist), default=0)}
    key = "ntp_loss" if any("ntp_loss" in h for h in logs) else "loss"
    tail = [h[key] for h in logs if key in h][-10:]
    if tail:
        out["train_final_ntp_loss"] = sum(tail) / len(tail)
    end = [h for h in hist if "train_runtime" in h]
    if end:
        out["train_runtime"] = end[-1]["train_runtime"]
        if out["train_steps"]:
            out["s_per_step"] = end[-1]["train_runtime"] / out["train_steps"]
    return out


def finish_report(emb: Embedded, cargs: ContrastiveArguments, settings: Dict[str, Any], paths: Dict[str, Any], *,
                  run_dir: Optional[Path], trainer_state: Optional[str], output_dir: Optional[str], figures: bool,
                  t0: float, return_embeddings: bool = False, baseline: Optional[Dict[str, Any]] = None
                  ) -> Dict[str, Any]:
    """The report of either host: metrics, training summary, ``settings`` / ``paths`` (host-specific
    entries) completed with the generic ones, the provenance (seed, versions, git, file digests) and,
    given a ``baseline`` report (``provenance.load_report``), the metrics side by side; figures and
    report.json in ``output_dir`` when given."""
    report: Dict[str, Any] = metrics_from_embeddings(emb)
    trainer_state_path = Path(trainer_state) if trainer_state else find_trainer_state(run_dir)
    report.update(train_summary(trainer_state_path))
    report["records"] = emb.records
    report["ntp_tokens"] = emb.ntp_tokens
    report["settings"] = {
        **settings,
        "duplicates_masked": emb.keys is not None,
        "embedding": {k: getattr(cargs, k) for k in EMBEDDING_FLAGS},
        "run_contrastive_weight": settings.get("run_contrastive_weight", _run_weight(run_dir)),
    }
    report["paths"] = {
        **paths,
        "trainer_state": str(trainer_state_path) if trainer_state_path else None,
        "output_dir": str(output_dir) if output_dir else None,
    }
    report["provenance"] = provenance(run_dir, report["paths"])
    if baseline is not None:
        report["baseline"] = compare_with_baseline(report, baseline)
    if output_dir:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        figs = {}
        if figures:
            name = run_name(run_dir, output_dir)
            plot_similarity_hist(emb.image, emb.text, out / "similarity_hist.png", title=name)
            figs["similarity_hist"] = str(out / "similarity_hist.png")
            plot_projection(emb.image, emb.text, report["modality_gap"], out / "embedding_projection.png", title=name)
            figs["embedding_projection"] = str(out / "embedding_projection.png")
            if trainer_state_path is not None and plot_training_curves(trainer_state_path, out / "training_curves.png",
                                                                       title=name):
                figs["training_curves"] = str(out / "training_curves.png")
        report["paths"]["figures"] = figs
        report["eval_seconds"] = round(time.time() - t0, 2)
        (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    else:
        report["eval_seconds"] = round(time.time() - t0, 2)
    if return_embeddings:
        report["_embeddings"] = emb
    return report


def _run_weight(run_dir: Optional[Path]) -> Optional[float]:
    if run_dir is not None and (run_dir / HEAD_CONFIG_FILE).is_file():
        return json.loads((run_dir / HEAD_CONFIG_FILE).read_text()).get("contrastive_weight")
    return None


def format_report(report: Dict[str, Any]) -> str:
    n = int(report["n"])
    rows = [
        ("held-out pairs (n)", f"{n}"),
        ("chance (1/n)", f"{report['chance']:.4f}"),
        ("i2t R@1 / R@5 / R@10", f"{report['i2t@1']:.3f} / {report['i2t@5']:.3f} / {report['i2t@10']:.3f}"),
        ("t2i R@1 / R@5 / R@10", f"{report['t2i@1']:.3f} / {report['t2i@5']:.3f} / {report['t2i@10']:.3f}"),
        ("i2t R@1 / chance", f"{report['i2t@1'] / report['chance']:.1f}x"),
        ("modality gap", f"{report['modality_gap']:.4f}"),
        ("cosine pos / neg", f"{report['pos_mean']:.4f} / {report['neg_mean']:.4f}"),
        ("held-out NTP loss", f"{report['ntp_loss']:.4f}"),
    ]
    if "train_final_ntp_loss" in report:
        rows.append(("final train NTP loss", f"{report['train_final_ntp_loss']:.4f}"))
    if "s_per_step" in report:
        rows.append(("train s/step", f"{report['s_per_step']:.3f}"))
    width = max(len(r[0]) for r in rows)
    seed = (report.get("provenance") or {}).get("seed")
    lines = ["held-out alignment report" + (f" (training seed {seed})" if seed is not None else ""),
             "-" * (width + 24)]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    base = report.get("baseline")
    if base:
        lines += ["", f"against the baseline {base['path']} (n={base.get('n')}"
                      + ("" if base.get("same_data") is not False else ", OTHER held-out data") + ")"]
        for k, m in base["metrics"].items():
            lines.append(f"{k:<{width}}  {m['this']:.4f} vs {m['baseline']:.4f}  ({m['delta']:+.4f}, "
                         f"{'better' if m['better'] else 'worse'})")
    return "\n".join(lines)


def print_report(report: Dict[str, Any], output_dir: str) -> None:
    print(format_report(report))
    print(f"report: {Path(output_dir) / 'report.json'}")


def add_shared_args(p: argparse.ArgumentParser) -> None:
    """The flags both hosts' evaluation entry points take (data, outputs, embedding settings)."""
    p.add_argument("--head", default=None, help="directory with contrastive_head.safetensors (default: the projector's)")
    p.add_argument("--data_path", required=True, help="held-out LLaVA-Pretrain-format JSON")
    p.add_argument("--image_folder", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--max_samples", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--trainer_state", default=None, help="trainer_state.json (default: the run's, when found)")
    p.add_argument("--model_max_length", type=int, default=2048,
                   help="counts the image tokens too (576 at 336 px), as upstream's stage 1 (2048)")
    p.add_argument("--baseline", type=baseline_report, default=None, metavar="REPORT",
                   help="report.json (or eval dir) of another run: its metrics are set beside these ones")
    p.add_argument("--no_figures", action="store_true")
    p.add_argument("--no_progress", action="store_true")
    for f in dataclasses.fields(ContrastiveArguments):
        if f.name not in EMBEDDING_FLAGS:
            continue
        typ = {int: int, float: float, str: str, bool: _bool}.get(type(f.default), str)
        p.add_argument(f"--{f.name}", type=typ, default=None,
                       help=f"{f.metadata.get('help', '')} (default: the run's setting, else {f.default!r})")


def embedding_overrides(a: argparse.Namespace) -> Dict[str, Any]:
    """The ``--contrastive_*`` embedding flags given on the command line."""
    return {k: getattr(a, k) for k in EMBEDDING_FLAGS if getattr(a, k) is not None}


def shared_evaluate_kwargs(a: argparse.Namespace) -> Dict[str, Any]:
    """The keyword arguments of either host's ``evaluate`` that come from ``add_shared_args``' flags."""
    return dict(output_dir=a.output_dir, head=a.head, max_samples=a.max_samples, batch_size=a.batch_size,
                trainer_state=a.trainer_state, model_max_length=a.model_max_length,
                contrastive=embedding_overrides(a), figures=not a.no_figures, progress=not a.no_progress,
                baseline=a.baseline)


def baseline_report(path: str) -> Dict[str, Any]:
    """argparse type of --baseline: the loaded report, or a usage error (exit 2) before any model loads."""
    try:
        return load_report(path)
    except (OSError, ValueError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "y"):
        return True
    if v.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {v!r}")
