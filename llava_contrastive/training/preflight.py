"""Pre-flight: every mistake that flags and the file system reveal, caught before any model loads.

Pure functions of the command line (argv), the environment and the file system: no transformers
import, no model, no tokenizer (JSON files are read with ``json``). ``check_command(argv, host)``
returns the problems (``error`` stops the run, ``warning`` is printed and the run goes on);
``exit_on_errors`` prints them and ends the process with exit code 2 (no traceback) when any is an
error. ``run_preflight`` is what the entries call: checks, then (``--overwrite_output_dir True``)
removal of the old checkpoints, then ``OUTPUT_DIR/run_settings.json`` (rank 0).

Resume safety: a run whose ``--output_dir`` already holds checkpoints resumes from them (upstream's
``train()``, the native host's auto-resume). Its settings (``run_settings``: contrastive config,
model and tower (their paths and the content of their files: a model rebuilt in place is another
model), data fingerprint, global batch, projector, seed, optimiser schedule) must equal the
saved ones, or the run is refused before the model loads, naming each difference (old -> new).
Settings in ``NOT_COMPARED`` may change on resume.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import typing
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from llava_contrastive.core.config import ContrastiveArguments

HOSTS = ("llava", "hf")
RUN_SETTINGS_FILE = "run_settings.json"
RUN_SETTINGS_FORMAT = 1
# printed once pre-flight passed, right before the model loads (tests key on it)
READY_MARKER = "llava-contrastive pre-flight: checks passed"
IMAGE_SAMPLE = 50  # records with an image looked at by the "every image missing" diagnosis
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_UPSTREAM_TOWER_PREFIXES = ("openai", "laion")  # llava/model/multimodal_encoder/builder.py accepts these ids
# model_type of a checkpoint's config.json -> the LLM family of the upstream host's contrastive class
# (none given: Llama, as upstream's train() assumes)
UPSTREAM_FAMILY_OF_MODEL_TYPE = {
    "": "llama", "llama": "llama", "llava_llama": "llama", "llava_llama_contrastive": "llama",
    "mistral": "mistral", "llava_mistral": "mistral", "llava_mistral_contrastive": "mistral"}
UPSTREAM_FAMILIES = "llama, mistral"
# the projector types the native host builds (hosts/hf/convert.NATIVE_PROJECTOR_ACT; a test compares)
NATIVE_PROJECTOR_TYPES = ("mlp2x_gelu", "linear")


def native_projector_refusal(kind: str) -> str:
    return (f"--mm_projector_type {kind}: transformers' LlavaForConditionalGeneration has a two-layer projector, which "
            f"computes {' and '.join(NATIVE_PROJECTOR_TYPES)} only. Fix: use one of those, or the upstream host "
            f"(llava-contrastive train) for deeper mlpNx_gelu.")
MPT_UNSUPPORTED = ("upstream's MPT path (LlavaMptForCausalLM) cannot run under this host's pinned stack: its train() "
                   "sets config.attn_config['attn_impl'], but transformers 4.37 loads MPT checkpoints with its own "
                   "MptConfig, whose attn_config is not a dict (MosaicML's remote code, which upstream expects, "
                   "needs triton and network access). Fix: use a Llama or Mistral LLM with this host, or the "
                   "transformers-native host (--host hf) for other families.")

# Flags read here, with the defaults of each host's argument classes (upstream llava.train.train +
# transformers 4.37 TrainingArguments; the native host's dataclasses + transformers 5). A test
# compares these tables with the real dataclasses.
_COMMON_DEFAULTS: Dict[str, Any] = {
    "data_path": None, "image_folder": None, "pretrain_mm_mlp_adapter": None, "output_dir": None,
    "overwrite_output_dir": False, "resume_from_checkpoint": None, "seed": 42, "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1, "learning_rate": 5e-5, "lr_scheduler_type": "linear", "warmup_steps": 0,
    "weight_decay": 0.0,
}
HOST_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "llava": {**_COMMON_DEFAULTS, "model_name_or_path": "facebook/opt-125m", "version": "v0", "vision_tower": None,
              "mm_projector_type": "linear", "mm_vision_select_layer": -1, "mm_vision_select_feature": "patch",
              "mm_use_im_start_end": False, "tune_mm_mlp_adapter": False, "model_max_length": 512,
              "warmup_ratio": 0.0, "lora_enable": False, "lora_r": 64, "bits": 16},
    "hf": {**_COMMON_DEFAULTS, "model_name_or_path": None, "llm_dir": None, "vision_dir": None,
           "vision_feature_layer": -2, "model_max_length": 2048, "mm_projector_type": None},
}
_BOOL_FLAGS = {"overwrite_output_dir", "mm_use_im_start_end", "tune_mm_mlp_adapter", "lora_enable"}
_INT_FLAGS = {"seed", "per_device_train_batch_size", "gradient_accumulation_steps", "mm_vision_select_layer",
              "model_max_length", "lora_r", "bits", "vision_feature_layer"}
_FLOAT_FLAGS = {"learning_rate", "warmup_ratio", "weight_decay", "warmup_steps"}
_PATH_SETTINGS = {"model_name_or_path", "vision_tower", "llm_dir", "vision_dir", "pretrain_mm_mlp_adapter"}
FULL_HASH_LIMIT = 16 << 20  # model files up to this size are hashed whole; larger ones by samples
SAMPLE_BYTES = 1 << 20
MAX_MODEL_FILES = 200
_DOC_SUFFIXES = (".md", ".lock")

# Compared on resume (besides every --contrastive_* flag, the data fingerprint and the global batch).
COMPARED: Dict[str, Tuple[str, ...]] = {
    "llava": ("model_name_or_path", "vision_tower", "mm_projector_type", "mm_vision_select_layer",
              "mm_vision_select_feature", "version", "tune_mm_mlp_adapter", "lora_enable", "lora_r", "bits",
              "pretrain_mm_mlp_adapter", "model_max_length", "seed", "learning_rate", "lr_scheduler_type",
              "warmup_ratio", "warmup_steps", "weight_decay"),
    "hf": ("model_name_or_path", "llm_dir", "vision_dir", "vision_feature_layer", "mm_projector_type",
           "pretrain_mm_mlp_adapter",
           "model_max_length", "seed", "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay"),
}

# Not compared on resume: may legitimately change between the interrupted command and its rerun.
NOT_COMPARED: Dict[str, str] = {
    "max_steps": "extending a run is a resume; the LR schedule is recomputed over the new length",
    "num_train_epochs": "same as --max_steps: training longer continues the same run",
    "save_steps": "checkpoint frequency, not training",
    "save_strategy": "checkpoint frequency, not training",
    "save_total_limit": "disk use, not training",
    "logging_steps": "logging only",
    "report_to": "logging only (e.g. wandb on the cluster, none on a laptop)",
    "run_name": "logging only",
    "dataloader_num_workers": "loading speed; the sampler order does not depend on it",
    "output_dir": "the directory being resumed",
    "overwrite_output_dir": "decides whether to resume at all",
    "resume_from_checkpoint": "picks the checkpoint, not the run",
    "data_path": "the data is identified by content (size + sha256), so a copy on local scratch resumes",
    "image_folder": "images may move with the data (the records are fingerprinted)",
    "per_device_train_batch_size": "only the global batch (x accumulation x world size) is compared",
    "gradient_accumulation_steps": "only the global batch is compared: more GPUs, less accumulation",
    "deepspeed": "the ZeRO config follows the hardware; an incompatible engine checkpoint fails at load",
    "bf16 / fp16 / tf32": "precision follows the hardware",
    "gradient_checkpointing": "memory only, same math",
    "vision_tower_dtype": "numerics of the frozen tower follow the hardware",
    "data_check*": "checking, not training",
    "nonfinite_max_skips": "a guard, not training",
    "contrastive_text_cache": "where cached text embeddings live; does not change results",
}


@dataclass(frozen=True)
class Problem:
    severity: str  # "error" | "warning"
    message: str  # names the flag/path and the fix

    def __str__(self) -> str:
        return f"{self.severity}: {self.message}"


def error(message: str) -> Problem:
    return Problem("error", message)


def warning(message: str) -> Problem:
    return Problem("warning", message)


# ---- parsing ------------------------------------------------------------------------------------
def str2bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "y", "t"):
        return True
    if text in ("false", "0", "no", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not a boolean (True or False)")


def _contrastive_type(f: dataclasses.Field):
    tp = f.type
    if typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return str2bool if tp is bool else tp


@dataclass(frozen=True)
class Command:
    """The flags pre-flight reads, defaults filled in; ``given`` holds the flags on the command line."""
    host: str
    values: Mapping[str, Any]
    given: frozenset

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    @property
    def contrastive(self) -> ContrastiveArguments:
        names = {f.name for f in dataclasses.fields(ContrastiveArguments)}
        return ContrastiveArguments(**{k: v for k, v in self.values.items() if k in names})


def parse_command(argv: Sequence[str], host: str) -> Command:
    """Read the flags pre-flight needs (every other flag is left to the host's parser). A value
    that does not parse (e.g. ``--seed x``) is left to the host's parser too (its default here)."""
    if host not in HOSTS:
        raise ValueError(f"host {host!r} is not one of {', '.join(HOSTS)}")
    defaults = dict(HOST_DEFAULTS[host])
    types: Dict[str, Any] = {}
    for name in defaults:
        types[name] = (str2bool if name in _BOOL_FLAGS else int if name in _INT_FLAGS
                       else float if name in _FLOAT_FLAGS else str)
    for f in dataclasses.fields(ContrastiveArguments):
        defaults[f.name] = f.default
        types[f.name] = _contrastive_type(f)
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for name in defaults:
        parser.add_argument(f"--{name}", default=None, nargs="?", const="True" if types[name] is str2bool else None)
    known = vars(parser.parse_known_args(list(argv))[0])
    values, given = {}, set()
    for name, default in defaults.items():
        raw = known.get(name)
        if raw is None:
            values[name] = default
            continue
        given.add(name)
        try:
            values[name] = types[name](raw)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            values[name] = default
    return Command(host, values, frozenset(given))


# ---- paths ---------------------------------------------------------------------------------------
def looks_local(path: str, cwd: Optional[str] = None) -> bool:
    """A path meant as a local directory: absolute, starting with . / ~, more than org/name, or
    whose first component exists here (``checkpoints/run1`` with a ``checkpoints`` folder)."""
    if path.startswith(("/", ".", "~")) or os.path.isabs(path) or "\\" in path:
        return True
    parts = path.split("/")
    if len(parts) > 2 or not _HUB_ID_RE.match(path):
        return True
    return len(parts) == 2 and os.path.exists(os.path.join(cwd or os.getcwd(), parts[0]))


def hf_cache_dir(env: Mapping[str, str]) -> str:
    """The Hugging Face hub cache huggingface_hub reads (HF_HUB_CACHE, HF_HOME/hub, XDG cache)."""
    if env.get("HF_HUB_CACHE"):
        return env["HF_HUB_CACHE"]
    if env.get("HUGGINGFACE_HUB_CACHE"):
        return env["HUGGINGFACE_HUB_CACHE"]
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                              "huggingface")
    return os.path.join(home, "hub")


def in_hf_cache(repo_id: str, env: Mapping[str, str]) -> bool:
    snapshots = os.path.join(hf_cache_dir(env), "models--" + repo_id.replace("/", "--"), "snapshots")
    return os.path.isdir(snapshots) and any(os.scandir(snapshots))


def offline(env: Mapping[str, str]) -> bool:
    return any(str(env.get(k, "")).strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_model_path(flag: str, value: Optional[str], env: Mapping[str, str], *, what: str,
                     cwd: Optional[str] = None) -> List[Problem]:
    """A local-looking path that does not exist, or a hub id that offline mode cannot reach."""
    if not value:
        return []
    full = os.path.expanduser(value)
    if os.path.exists(full if os.path.isabs(full) else os.path.join(cwd or os.getcwd(), full)):
        return []
    if looks_local(value, cwd):
        return [error(f"--{flag} {value}: path not found (no such directory for the {what}). Fix: point --{flag} "
                      f"at an existing local directory, or give a hub id (org/name).")]
    if offline(env) and not in_hf_cache(value, env):
        return [error(f"--{flag} {value}: a hub id, but offline mode is on (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE=1) "
                      f"and it is not in the local Hugging Face cache ({hf_cache_dir(env)}). Fix: download it "
                      f"first (huggingface-cli download {value}) or unset offline mode, or pass a local directory.")]
    return []


def check_upstream_tower_id(value: Optional[str], cwd: Optional[str] = None) -> List[Problem]:
    """Upstream's build_vision_tower takes a local directory or an id starting with openai/laion."""
    if not value or looks_local(value, cwd) or value.startswith(_UPSTREAM_TOWER_PREFIXES) or "ShareGPT4V" in value:
        return []
    full = value if os.path.isabs(value) else os.path.join(cwd or os.getcwd(), value)
    if os.path.exists(full):
        return []
    return [error(f"--vision_tower {value}: upstream LLaVA builds a tower only from a local directory or a hub id "
                  f"starting with openai/ or laion/ (otherwise 'Unknown vision tower' after the LLM has loaded). "
                  f"Fix: download the tower and pass its directory.")]


def local_model_type(path: Optional[str], cwd: Optional[str] = None) -> Optional[str]:
    """``model_type`` of the local checkpoint ``path`` (its config.json), or None when there is none to read."""
    config = os.path.join(cwd or os.getcwd(), os.path.expanduser(path or ""), "config.json")
    try:
        with open(config) as f:
            return json.load(f).get("model_type", "")
    except (OSError, ValueError, AttributeError):
        return None


def check_upstream_tower_kind(value: Optional[str], cwd: Optional[str] = None) -> List[Problem]:
    """Upstream's CLIPVisionTower loads every tower as CLIPVisionModel: a local SigLIP (or other) tower
    would fail after the LLM has loaded, or load with missing weights."""
    model_type = local_model_type(value, cwd)
    if model_type in (None, "clip", "clip_vision_model", ""):  # None: a hub id, or no readable config
        return []
    return [error(f"--vision_tower {value}: a {model_type!r} tower, and upstream LLaVA's CLIPVisionTower loads "
                  f"only CLIP towers. Fix: train with the transformers-native host (llava-contrastive train --host hf "
                  f"--vision_dir {value}), which takes CLIP and SigLIP towers.")]


# ---- data ----------------------------------------------------------------------------------------
def head_records(path: str, limit: int, chunk: int = 1 << 20) -> Tuple[bool, List[Any]]:
    """(is a JSON list, the first ``limit`` records with an ``image`` key), reading only as much of
    the file as needed (a 558k-record corpus is not parsed here; the data check does that)."""
    decoder = json.JSONDecoder()
    found: List[Any] = []
    with open(path, "r", encoding="utf-8") as f:
        buf = f.read(chunk)
        eof = len(buf) < chunk
        pos = len(buf) - len(buf.lstrip())
        if not buf[pos:pos + 1] == "[":
            return False, []
        pos += 1
        while len(found) < limit:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(buf):
                if eof:
                    break
                more = f.read(chunk)
                eof = len(more) < chunk
                buf, pos = buf[pos:] + more, 0
                continue
            if buf[pos] == "]":
                break
            try:
                obj, pos = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    break  # malformed JSON: the data check reports it with its position
                more = f.read(chunk)
                eof = len(more) < chunk
                buf, pos = buf[pos:] + more, 0
                continue
            if isinstance(obj, dict) and obj.get("image"):
                found.append(obj)
    return True, found


def record_images(record: Mapping[str, Any]) -> List[str]:
    image = record.get("image")
    return [str(i) for i in image] if isinstance(image, list) else [str(image)]


def check_data(data_path: Optional[str], image_folder: Optional[str], *, cwd: Optional[str] = None) -> List[Problem]:
    """--data_path exists and holds a JSON list; --image_folder exists; not every sampled image is missing."""
    if not data_path:
        return [error("--data_path is not given. Fix: pass the training JSON, e.g. --data_path "
                      "./playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json.")]
    base = cwd or os.getcwd()
    full = os.path.join(base, os.path.expanduser(data_path))
    if not os.path.isfile(full):
        what = "is a directory" if os.path.isdir(full) else "does not exist"
        return [error(f"--data_path {data_path} {what}. Fix: point --data_path at the training JSON (a list of "
                      f"records with 'image' and 'conversations').")]
    try:
        is_list, sample = head_records(full, IMAGE_SAMPLE)
    except (OSError, UnicodeDecodeError) as err:
        return [error(f"--data_path {data_path}: cannot be read as JSON text ({err}). Fix: pass the training JSON.")]
    if not is_list:
        return [error(f"--data_path {data_path}: not a JSON list of records (the file does not start with '['); "
                      f"upstream LLaVA reads one JSON list (JSON lines are not supported). Fix: convert it to a list.")]
    if not sample:
        return []
    if not image_folder:
        return [error(f"--image_folder is not given, but the records of --data_path {data_path} have images "
                      f"(e.g. {record_images(sample[0])[0]!r}). Fix: pass --image_folder, the folder those paths are "
                      f"relative to.")]
    folder = os.path.join(base, os.path.expanduser(image_folder))
    first = os.path.normpath(os.path.join(folder, record_images(sample[0])[0]))
    if not os.path.isdir(folder):
        return [error(f"--image_folder {image_folder} does not exist (first image path would be {first}). Fix: point "
                      f"--image_folder at the folder the records' 'image' paths are relative to.")]
    paths = [os.path.normpath(os.path.join(folder, img)) for rec in sample for img in record_images(rec)]
    if paths and not any(os.path.isfile(p) for p in paths):
        return [error(f"every image missing: check --image_folder, first missing path is {first} (none of the "
                      f"{len(paths)} images of the first {len(sample)} records with an image exists under "
                      f"--image_folder {image_folder}). Fix: point --image_folder at the folder the records' 'image' "
                      f"paths are relative to (--data_check_policy skip would skip every record).")]
    return []


# ---- flag combinations ---------------------------------------------------------------------------
def check_contrastive(cmd: Command) -> List[Problem]:
    """Invalid values (errors), and flags that another flag makes inert (warnings)."""
    try:
        args = cmd.contrastive
        args.validate()
    except (ValueError, TypeError) as err:
        return [error(f"{err}. Fix: see --help for the allowed values.")]
    given = cmd.given
    if not args.enabled:
        inert = sorted(n for n in given if n.startswith("contrastive_") and n != "contrastive_weight")
        return [warning(f"{', '.join('--' + n for n in inert)} {'has' if len(inert) == 1 else 'have'} no effect with "
                        f"--contrastive_weight 0 (the contrastive term is off). Fix: drop "
                        f"{'it' if len(inert) == 1 else 'them'}, or set --contrastive_weight > 0.")] if inert else []
    out = []
    if args.contrastive_text_source == "input_embeds":
        for name in ("contrastive_prompt", "contrastive_text_layer", "contrastive_text_cache"):
            if name in given:
                out.append(warning(
                    f"--{name} is unused with --contrastive_text_source input_embeds (the default: the caption's input "
                    f"embeddings, no text-only LLM pass). Fix: add --contrastive_text_source llm to use it, or drop "
                    f"--{name}."))
    if args.contrastive_image_source == "projector" and "contrastive_image_layer" in given:
        out.append(warning("--contrastive_image_layer is unused with --contrastive_image_source projector (the "
                           "default). Fix: add --contrastive_image_source llm to use it, or drop it."))
    if args.contrastive_head == "none" and "contrastive_head_dim" in given:
        out.append(warning("--contrastive_head_dim is unused with --contrastive_head none (the default). Fix: add "
                           "--contrastive_head linear to use it, or drop it."))
    return out


def check_template(cmd: Command) -> List[Problem]:
    """Upstream host: the contrastive term needs caption-only labels (plain template, no start/end tokens)."""
    if cmd.host != "llava" or not cmd.contrastive.enabled:
        return []
    out = []
    weight = cmd["contrastive_weight"]
    if cmd["version"] != "plain":
        out.append(error(f"--version {cmd['version']} with --contrastive_weight {weight:g}: the contrastive term needs "
                         f"caption-only labels, which only upstream's plain template (stage 1) gives. Fix: pass "
                         f"--version plain (stage-1 recipe), or --contrastive_weight 0 (stage 2, instruction tuning)."))
    if cmd["mm_use_im_start_end"]:
        out.append(error(f"--mm_use_im_start_end True with --contrastive_weight {weight:g}: it trains the input "
                         f"embeddings, but the contrastive term assumes a frozen text side. Fix: pass "
                         f"--mm_use_im_start_end False (upstream's v1.5 recipe), or --contrastive_weight 0."))
    return out


def check_models(cmd: Command, env: Mapping[str, str], cwd: Optional[str] = None) -> List[Problem]:
    out: List[Problem] = []
    if cmd.host == "llava":
        llm = check_model_path("model_name_or_path", cmd["model_name_or_path"], env, what="LLM", cwd=cwd)
        out += llm or check_upstream_family(cmd["model_name_or_path"], cwd)
        if not cmd["vision_tower"]:
            out.append(error("--vision_tower is not given: a LLaVA run needs a vision tower. Fix: pass e.g. "
                             "--vision_tower openai/clip-vit-large-patch14-336 (or its local directory)."))
        else:
            tower = check_model_path("vision_tower", cmd["vision_tower"], env, what="vision tower", cwd=cwd)
            out += tower or check_upstream_tower_id(cmd["vision_tower"], cwd) or \
                check_upstream_tower_kind(cmd["vision_tower"], cwd)
    else:
        if not cmd["model_name_or_path"] and not (cmd["llm_dir"] and cmd["vision_dir"]):
            out.append(error("no model given. Fix: pass --model_name_or_path NATIVE_DIR (convert.py build), or "
                             "--llm_dir LLM --vision_dir CLIP."))
        out += check_model_path("model_name_or_path", cmd["model_name_or_path"], env, what="native LLaVA checkpoint",
                                cwd=cwd)
        out += check_model_path("llm_dir", cmd["llm_dir"], env, what="LLM", cwd=cwd)
        out += check_model_path("vision_dir", cmd["vision_dir"], env, what="vision tower", cwd=cwd)
        kind = cmd["mm_projector_type"]
        if kind is not None and kind not in NATIVE_PROJECTOR_TYPES:
            out.append(error(native_projector_refusal(kind)))
    adapter = cmd["pretrain_mm_mlp_adapter"]
    if adapter and not os.path.isfile(os.path.join(cwd or os.getcwd(), os.path.expanduser(adapter))):
        out.append(error(f"--pretrain_mm_mlp_adapter {adapter}: file not found. Fix: point it at the mm_projector.bin "
                         f"of a stage-1 run (OUTPUT_DIR/mm_projector.bin), or drop the flag."))
    return out


def check_upstream_family(model: Optional[str], cwd: Optional[str] = None) -> List[Problem]:
    """Upstream host: an LLM of a family its contrastive classes cover (from a local config.json)."""
    if not model:
        return []
    model_type = local_model_type(model, cwd)  # None: a hub id, or no readable config: left to the loader
    # upstream's train() takes its MPT path for any path containing "mpt", whatever the model is
    if "mpt" in model and "mpt" not in (model_type or ""):
        return [error(f"--model_name_or_path {model}: the path contains 'mpt', and upstream's train() then loads "
                      f"the model as MPT whatever it is (e.g. a directory under '.../attempt/'). "
                      + ("" if model_type not in (None, "") else f"{MPT_UNSUPPORTED} ")
                      + "Fix: for a Llama or Mistral model, pass a path without 'mpt' in it (a symlink will do).")]
    if model_type is None:
        return []
    try:
        upstream_family(model_type)
    except ValueError as err:
        return [error(f"--model_name_or_path {model}: {err}")]
    return []


def upstream_family(model_type: str) -> str:
    """The upstream host's LLM family ("llama", "mistral") of a checkpoint's model_type; a ValueError
    naming the fix for MPT (cannot run under the pinned stack) and for families upstream does not ship."""
    if model_type in UPSTREAM_FAMILY_OF_MODEL_TYPE:
        return UPSTREAM_FAMILY_OF_MODEL_TYPE[model_type]
    if "mpt" in model_type:
        raise ValueError(MPT_UNSUPPORTED)
    raise ValueError(f"model_type {model_type!r} is not a family upstream LLaVA ships ({UPSTREAM_FAMILIES}). Fix: use "
                     f"the transformers-native host (llava-contrastive train --host hf), which takes any text model "
                     f"LlavaForConditionalGeneration accepts.")


# ---- output directory, run settings --------------------------------------------------------------
def checkpoints(output_dir: str) -> List[str]:
    """checkpoint-N directories in output_dir, by step (what upstream's train() resumes from)."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(output_dir) if (m := _CHECKPOINT_RE.match(n))
             and os.path.isdir(os.path.join(output_dir, n))]
    return [os.path.join(output_dir, n) for _, n in sorted(found)]


def file_fingerprint(path: str, cached: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """{size, sha256} of a file; the sha256 is taken from ``cached`` when size and mtime match it."""
    st = os.stat(path)
    if cached and cached.get("size") == st.st_size and cached.get("mtime_ns") == st.st_mtime_ns \
            and cached.get("sha256"):
        return {"size": st.st_size, "sha256": cached["sha256"], "mtime_ns": st.st_mtime_ns}
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return {"size": st.st_size, "sha256": h.hexdigest(), "mtime_ns": st.st_mtime_ns}


def content_digest(path: str) -> str:
    """sha256 (16 hex) of a file's content: all of it up to ``FULL_HASH_LIMIT`` bytes, else of its size and
    three 1 MiB samples (start, middle, end: a re-trained or re-converted weight file differs there; a
    13B checkpoint costs ~10 MB of reads instead of 26 GB)."""
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FULL_HASH_LIMIT:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
            return h.hexdigest()[:16]
        h.update(str(size).encode())
        for offset in (0, size // 2, size - SAMPLE_BYTES):
            f.seek(offset)
            h.update(f.read(SAMPLE_BYTES))
    return "sampled:" + h.hexdigest()[:16]


def model_files(path: str) -> Optional[Dict[str, str]]:
    """{file name: content_digest} of a local model directory's top-level files (config, tokenizer,
    weights; hidden files, docs and sub-directories skipped), or of one file (an adapter); None for a
    hub id or a missing path. Identifies what a path holds, so a model rebuilt in place is not
    mistaken for the one a checkpoint was trained with."""
    if not path or not os.path.exists(path):
        return None
    if os.path.isfile(path):
        return {os.path.basename(path): content_digest(path)}
    names = sorted(n for n in os.listdir(path) if not n.startswith(".") and not n.lower().endswith(_DOC_SUFFIXES)
                   and os.path.isfile(os.path.join(path, n)))
    return {n: content_digest(os.path.join(path, n)) for n in names[:MAX_MODEL_FILES]}


def _model_files_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """"--vision_tower: config.json, model.safetensors changed; tokenizer.json added" for each flag."""
    parts = []
    for flag in sorted(set(old) | set(new)):
        a, b = old.get(flag) or {}, new.get(flag) or {}
        if a == b:
            continue
        kinds = [(verb, sorted(names)) for verb, names in (
            ("changed", [n for n in a if n in b and a[n] != b[n]]), ("added", [n for n in b if n not in a]),
            ("removed", [n for n in a if n not in b])) if names]
        parts.append(f"--{flag}: " + "; ".join(f"{', '.join(names)} {verb}" for verb, names in kinds))
    return "; ".join(parts)


def _normalise_path(value: Optional[str], cwd: str) -> Optional[str]:
    if not value:
        return value
    full = os.path.join(cwd, os.path.expanduser(value))
    return os.path.realpath(full) if os.path.exists(full) or looks_local(value, cwd) else value


def global_batch_fix(global_batch: int, world: int, accumulation: int) -> str:
    """The flag that keeps ``global_batch`` on ``world`` ranks with ``accumulation`` (resume advice)."""
    per_device, rest = divmod(global_batch, max(1, world * accumulation))
    if not rest and per_device:
        return f"--per_device_train_batch_size {per_device}"
    return f"a per-device batch x gradient accumulation that multiplies to {global_batch} over {world} rank(s)"


def run_settings(cmd: Command, env: Mapping[str, str], cwd: Optional[str] = None,
                 cached_data: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """{"compared": what must match on resume, "info": the rest worth recording}."""
    cwd = cwd or os.getcwd()
    world = int(env.get("WORLD_SIZE", "1") or 1)
    compared: Dict[str, Any] = {}
    for name in COMPARED[cmd.host]:
        compared[name] = _normalise_path(cmd[name], cwd) if name in _PATH_SETTINGS else cmd[name]
    compared.update(cmd.contrastive.to_dict())
    compared["global_batch"] = cmd["per_device_train_batch_size"] * cmd["gradient_accumulation_steps"] * world
    data = os.path.join(cwd, os.path.expanduser(cmd["data_path"])) if cmd["data_path"] else None
    fp = file_fingerprint(data, cached_data) if data and os.path.isfile(data) else None
    compared["data_fingerprint"] = {"size": fp["size"], "sha256": fp["sha256"]} if fp else None
    compared["model_files"] = {name: files for name in COMPARED[cmd.host] if name in _PATH_SETTINGS
                               and (files := model_files(compared[name])) is not None}
    info = {"host": cmd.host, "data_path": os.path.realpath(data) if data else None,
            "data_file": fp, "image_folder": _normalise_path(cmd["image_folder"], cwd), "world_size": world,
            "per_device_train_batch_size": cmd["per_device_train_batch_size"],
            "gradient_accumulation_steps": cmd["gradient_accumulation_steps"],
            "omp_num_threads": env.get("OMP_NUM_THREADS")}
    return {"format": RUN_SETTINGS_FORMAT, "compared": compared, "info": info,
            "not_compared": sorted(NOT_COMPARED)}


def read_run_settings(output_dir: str) -> Optional[Dict[str, Any]]:
    path = os.path.join(output_dir, RUN_SETTINGS_FILE)
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("compared"), dict) else None


def differences(saved: Mapping[str, Any], new: Mapping[str, Any]) -> List[Tuple[str, Any, Any]]:
    """(setting, old, new) for every setting of ``new`` whose saved value differs (settings the saved
    file lacks, e.g. written by an older version, are skipped)."""
    out = []
    for name, value in new.items():
        if name in saved and not _same(saved[name], value):
            out.append((name, saved[name], value))
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def _show(name: str, value: Any) -> str:
    if name == "data_fingerprint" and isinstance(value, dict):
        return f"{value.get('size')} bytes, sha256 {str(value.get('sha256'))[:12]}"
    return repr(value)


def check_output_dir(cmd: Command, env: Mapping[str, str], cwd: Optional[str] = None) -> List[Problem]:
    """The output directory is usable; a resume (checkpoints present) has the saved settings."""
    out_dir = cmd["output_dir"]
    if not out_dir:
        return []
    cwd = cwd or os.getcwd()
    full = os.path.join(cwd, os.path.expanduser(out_dir))
    if os.path.exists(full) and not os.path.isdir(full):
        return [error(f"--output_dir {out_dir} is a file. Fix: pass a directory.")]
    problems: List[Problem] = []
    resume_from = cmd["resume_from_checkpoint"]
    if resume_from and cmd.host == "llava":
        problems.append(warning(f"--resume_from_checkpoint {resume_from} is not read by upstream's train(): it resumes "
                                f"from the last checkpoint-* in --output_dir when there is one. Fix: drop the flag; to "
                                f"continue another run, pass its directory as --output_dir."))
    elif resume_from and resume_from.lower() not in ("true", "false") \
            and not os.path.isdir(os.path.join(cwd, resume_from)):
        return problems + [error(f"--resume_from_checkpoint {resume_from}: no such checkpoint directory. Fix: pass "
                                 f"an existing checkpoint-N directory, or drop the flag to resume from --output_dir.")]
    found = checkpoints(full)
    if not found:
        if os.path.isfile(os.path.join(full, "mm_projector.bin")):
            problems.append(warning(f"--output_dir {out_dir} holds a finished run (mm_projector.bin, no checkpoint-*): "
                                    f"it is trained again from step 0 and overwritten. Fix: pass another --output_dir "
                                    f"to keep it."))
        return problems
    if cmd["overwrite_output_dir"]:
        problems.append(warning(f"--overwrite_output_dir True: the {len(found)} checkpoint(s) in {out_dir} "
                                f"({', '.join(os.path.basename(p) for p in found)}) are removed and training starts "
                                f"from step 0."))
        return problems
    fix = (f"Fix: pass another --output_dir for the new settings, or --overwrite_output_dir True to start over in "
           f"{out_dir} (its checkpoints are removed); rerun the original command to resume.")
    saved = read_run_settings(full)
    new = run_settings(cmd, env, cwd, cached_data=(saved or {}).get("info", {}).get("data_file"))["compared"]
    if saved is None:
        legacy = _legacy_contrastive_settings(found[-1])
        if legacy is None:
            return problems + [warning(f"--output_dir {out_dir} holds {os.path.basename(found[-1])} but no "
                                       f"{RUN_SETTINGS_FILE} (written by an older version): resuming without checking "
                                       f"that the settings match.")]
        saved = {"compared": legacy}
    diff = differences(saved["compared"], new)
    batch = next(((a, b) for n, a, b in diff if n == "global_batch"), None)
    if batch and isinstance(batch[0], int):
        world = int(env.get("WORLD_SIZE", "1") or 1)
        fix = (f"Fix: to resume on {world} rank(s), keep the global batch {batch[0]} with "
               f"{global_batch_fix(batch[0], world, cmd['gradient_accumulation_steps'])}; or " + fix[5].lower() + fix[6:])
    if diff:
        listed = "; ".join(
            f"model files differ ({_model_files_changes(a, b)})" if n == "model_files"
            else f"{n} {_show(n, a)} -> {_show(n, b)}" if n in ("global_batch", "data_fingerprint")
            else f"--{n} {_show(n, a)} -> {_show(n, b)}" for n, a, b in diff)
        problems.append(error(f"--output_dir {out_dir} holds checkpoints of a run with other settings (resuming would "
                              f"mix two runs in one trainer_state.json): {listed}. {fix}"))
    return problems


def _legacy_contrastive_settings(checkpoint: str) -> Optional[Dict[str, Any]]:
    """The contrastive config a checkpoint of an older version saved beside its head (if any)."""
    try:
        with open(os.path.join(checkpoint, "contrastive_config.json")) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ---- the whole check, and acting on it -------------------------------------------------------------
def check_command(argv: Sequence[str], host: str, env: Optional[Mapping[str, str]] = None,
                  cwd: Optional[str] = None) -> List[Problem]:
    """Every problem pre-flight finds in a training command (errors first, in command order)."""
    env = os.environ if env is None else env
    cmd = parse_command(argv, host)
    problems = check_template(cmd) + check_contrastive(cmd) + check_models(cmd, env, cwd) \
        + check_data(cmd["data_path"], cmd["image_folder"], cwd=cwd) + check_output_dir(cmd, env, cwd)
    return sorted(problems, key=lambda p: p.severity != "error")


def format_problems(problems: Sequence[Problem]) -> str:
    errors = sum(p.severity == "error" for p in problems)
    head = (f"llava-contrastive pre-flight: {errors} error(s), {len(problems) - errors} warning(s); "
            f"nothing was loaded" if errors else "llava-contrastive pre-flight")
    return head + "\n" + "".join(f"  {p}\n" for p in problems)


def exit_on_errors(problems: Sequence[Problem], stream=None) -> None:
    """Print the problems (one paragraph each); exit with code 2, no traceback, if any is an error."""
    if not problems:
        return
    stream = stream or sys.stderr
    rank = int(os.environ.get("RANK", "0") or 0)
    node_leader = int(os.environ.get("LOCAL_RANK", "0") or 0) == 0  # one copy per node (file systems may differ)
    if rank == 0 or (node_leader and any(p.severity == "error" for p in problems)):
        stream.write((f"[rank {rank}] " if rank else "") + format_problems(problems))
        stream.flush()
    if any(p.severity == "error" for p in problems):
        raise SystemExit(2)


def start_over(output_dir: str) -> List[str]:
    """--overwrite_output_dir True: remove checkpoint-* (and interrupted tmp-checkpoint-*), so the
    run starts from step 0 instead of resuming (transformers' example scripts' meaning of the flag;
    upstream's train() would resume from them regardless). Rank 0 only; returns the removed paths."""
    removed = []
    if not os.path.isdir(output_dir):
        return removed
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if (_CHECKPOINT_RE.match(name) or name.startswith("tmp-checkpoint-")) and os.path.isdir(path):
            shutil.rmtree(path)
            removed.append(path)
    return removed


def write_run_settings(output_dir: str, settings: Mapping[str, Any]) -> str:
    from llava_contrastive.training.checkpointing import atomic_write_text  # imports torch: only when writing

    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, RUN_SETTINGS_FILE)
    atomic_write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", path)
    return path


def strip_flag(argv: Sequence[str], name: str) -> List[str]:
    """argv without ``--name [value]`` / ``--name=value`` (for a flag the host's parser does not know)."""
    out, skip = [], False
    args = list(argv)
    for i, a in enumerate(args):
        if skip:
            skip = False
            continue
        if a == f"--{name}":
            nxt = args[i + 1] if i + 1 < len(args) else None
            skip = nxt is not None and not nxt.startswith("--")
            continue
        if a.startswith(f"--{name}="):
            continue
        out.append(a)
    return out


_DONE: Dict[Tuple[str, Tuple[str, ...]], List[Problem]] = {}


def run_preflight(argv: Sequence[str], host: str, stream=None) -> List[Problem]:
    """The entries' pre-flight: check (exit 2 on errors), then on rank 0 remove old checkpoints under
    --overwrite_output_dir True, write OUTPUT_DIR/run_settings.json and print READY_MARKER (one
    stderr line: the logging of the host may not be set up yet). Once per process and command: a
    second call with the same argv returns the first one's problems."""
    stream = stream or sys.stderr
    key = (host, tuple(argv))
    if key in _DONE:  # an entry that pre-flighted before its heavy imports, then its run()
        return _DONE[key]
    problems = check_command(argv, host)
    exit_on_errors(problems, stream)
    _DONE[key] = problems
    cmd = parse_command(argv, host)
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return problems
    where = ""
    if cmd["output_dir"]:
        out_dir = os.path.abspath(os.path.expanduser(cmd["output_dir"]))
        if cmd["overwrite_output_dir"]:
            for path in start_over(out_dir):
                stream.write(f"llava-contrastive pre-flight: --overwrite_output_dir True: removed {path}\n")
        saved = read_run_settings(out_dir)
        settings = run_settings(cmd, os.environ, cached_data=(saved or {}).get("info", {}).get("data_file"))
        where = f"; settings in {write_run_settings(out_dir, settings)}"
    stream.write(f"{READY_MARKER} ({len(problems)} warning(s){where})\n")
    stream.flush()
    return problems


__all__ = ["Problem", "Command", "COMPARED", "NOT_COMPARED", "READY_MARKER", "RUN_SETTINGS_FILE", "parse_command",
           "check_command", "check_data", "check_contrastive", "check_template", "check_models", "check_output_dir",
           "run_settings", "differences", "exit_on_errors", "format_problems", "start_over", "write_run_settings",
           "run_preflight", "strip_flag", "head_records", "looks_local", "file_fingerprint", "model_files",
           "content_digest"]
