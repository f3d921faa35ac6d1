"""Launch the real training CLIs (subprocesses) on the tiny assets and read what they wrote."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Optional

REPO = Path(__file__).resolve().parents[2]
ZERO2 = REPO / "scripts" / "zero2.json"
ZERO3 = REPO / "scripts" / "zero3.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage1_args(assets, output_dir: Path, *, steps: int = 12, batch: int = 8, extra: Iterable[str] = ()) -> list[str]:
    return [
        "--model_name_or_path", str(assets.llm_dir), "--version", "plain",
        "--data_path", str(assets.pretrain_json), "--image_folder", str(assets.image_folder),
        "--vision_tower", str(assets.vision_dir), "--mm_projector_type", "mlp2x_gelu",
        "--tune_mm_mlp_adapter", "True", "--mm_vision_select_layer", "-2",
        "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False",
        "--output_dir", str(output_dir), "--max_steps", str(steps),
        "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", "1",
        "--learning_rate", "1e-3", "--weight_decay", "0.", "--warmup_ratio", "0.03",
        "--lr_scheduler_type", "cosine", "--logging_steps", "1", "--save_strategy", "steps",
        "--save_steps", "1000", "--model_max_length", "96", "--dataloader_num_workers", "0",
        "--lazy_preprocess", "True", "--report_to", "none", "--seed", "7", *extra,
    ]


def stage2_args(assets, output_dir: Path, projector: Path, *, lora: bool, steps: int = 4, batch: int = 4,
                extra: Iterable[str] = ()) -> list[str]:
    """scripts/finetune_lora.sh (lora) / finetune.sh on the tiny instruct data, a few steps."""
    mode = (["--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16", "--mm_projector_lr", "2e-5",
             "--learning_rate", "2e-4"] if lora else ["--learning_rate", "2e-5"])
    return [
        *mode, "--model_name_or_path", str(assets.llm_dir), "--version", "v1",
        "--data_path", str(assets.instruct_json), "--image_folder", str(assets.instruct_image_folder),
        "--vision_tower", str(assets.vision_dir), "--pretrain_mm_mlp_adapter", str(projector),
        "--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-2",
        "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False",
        "--image_aspect_ratio", "pad", "--group_by_modality_length", "True",
        "--output_dir", str(output_dir), "--max_steps", str(steps), "--num_train_epochs", "1",
        "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", "1",
        "--weight_decay", "0.", "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--logging_steps", "1",
        "--save_strategy", "no", "--model_max_length", "256", "--dataloader_num_workers", "0",
        "--lazy_preprocess", "True", "--report_to", "none", "--seed", "7", "--contrastive_weight", "0", *extra,
    ]


def env(nproc: int = 1) -> dict:
    e = dict(os.environ)
    e.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             LLAVA_CONTRASTIVE_QUIET="1", PYTHONPATH=f"{REPO}{os.pathsep}{e.get('PYTHONPATH', '')}")
    if nproc > 1:
        e["OMP_NUM_THREADS"] = "1"
    e.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "llava-contrastive" / "torch_extensions"))
    return e


def command(module: str, args: list[str], nproc: int = 1, force_launcher: bool = False) -> list[str]:
    if nproc == 1 and not force_launcher:
        return [sys.executable, "-m", module, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), "-m", module, *args]


def run_killing_group(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run, but a timeout kills the whole process group: the launcher's ranks too, which
    would otherwise live on, holding CPU, ports and locks, through the tests after this one."""
    with subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            raise AssertionError(f"{' '.join(cmd)}\ntimed out after {timeout} s (process group killed)\n"
                                 f"{err[-6000:]}") from None
        except BaseException:  # pytest-timeout's signal, Ctrl-C
            os.killpg(p.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def run(module: str, args: list[str], *, nproc: int = 1, timeout: int = 900, check: bool = True,
        log: Optional[Path] = None, force_launcher: bool = False, extra_env: Optional[dict] = None
        ) -> subprocess.CompletedProcess:
    cmd = command(module, args, nproc, force_launcher)
    proc = run_killing_group(cmd, env={**env(nproc), **(extra_env or {})}, timeout=timeout)
    if log is not None:
        log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}\nexit {proc.returncode}\n{proc.stderr[-6000:]}")
    return proc


def train_logs(output_dir: Path) -> list[dict]:
    """Per-step training logs (trainer_state.json of the run, or of its last checkpoint)."""
    state = output_dir / "trainer_state.json"
    if not state.exists():
        ckpts = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        state = ckpts[-1] / "trainer_state.json"
    history = json.loads(state.read_text())["log_history"]
    return [h for h in history if "loss" in h and "step" in h]


def series(logs: list[dict], key: str) -> list[float]:
    return [h[key] for h in logs]
