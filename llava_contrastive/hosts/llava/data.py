"""The data check in upstream's training: ``make_checked_data_module`` replaces
``llava.train.train.make_supervised_data_module``.

* The check (llava_contrastive/data/check.py) runs ONCE, on global rank 0; the other ranks wait
  (a gloo broadcast with a long timeout, so a full check of 558k images does not trip the NCCL
  watchdog) and receive the same report. ``OUTPUT_DIR/data_check_report.json`` is written by the main process.
* ``--data_check_policy error`` + bad records: every rank raises ``DataCheckError`` with the
  report's summary before the trainer is built (no hang, no checkpoint).
* ``--data_check_policy skip``: the dataset holds exactly the good records; the skipped ones are
  listed in ``OUTPUT_DIR/skipped_records.json``.
* During training the dataset is a ``GuardedDataset``: a sample that fails to load (a file
  deleted or corrupted after the check) raises ``DataCheckError`` naming the record under
  ``error``; under ``skip`` it is logged, counted (``dataset.runtime_skips``, also appended to
  ``OUTPUT_DIR/runtime_skipped_records.jsonl``) and replaced by the next loadable record, up to
  1% of the records + 10, beyond which ``DataCheckError`` is raised.

The host-agnostic parts (the rank-0 check and broadcast, report / skip files, GuardedDataset,
FlaggingCollator) are llava_contrastive/data/guard.py, shared with the native host; this module
adds what is upstream's: its data module, its dataset's ``list_data_dict``, its conversation template.
"""
from __future__ import annotations

import copy
import logging
import os
from typing import Any, Callable, Optional

from llava_contrastive.data.check import (FIX_HINT, BadRecord, CheckReport, DataCheckArguments, DataCheckError,  # noqa: F401
                           check_records, classify_exception, default_cache_path, load_records,
                           validate_settings, write_json_atomic)
# the host-agnostic parts live in the core (llava_contrastive/data/guard.py), shared with hosts/hf
from llava_contrastive.data.guard import (BAD_RECORD_KEY, BAD_RECORDS_KEY, CHECKED_DATA_NAME, REPORT_NAME,  # noqa: F401
                           RUNTIME_SKIPS_NAME, SKIPPED_NAME, WAIT_TIMEOUT_ENV, FlaggingCollator, GuardedDataset,
                           _Counter, data_check_settings, note_skipped, run_data_check, runtime_log_path)
from llava_contrastive.data.guard import check_once as _check_once  # noqa: F401

logger = logging.getLogger("llava_contrastive")


def data_stage() -> str:
    """'pretrain' when upstream's conversation template is plain (stage 1, preprocess_plain), else 'instruct'."""
    try:
        import importlib

        conversation = importlib.import_module("llava.conversation")
        plain = conversation.default_conversation.sep_style == conversation.SeparatorStyle.PLAIN
        return "pretrain" if plain else "instruct"
    except Exception:  # pragma: no cover - host without llava.conversation
        return "pretrain"


def make_checked_data_module(original_make: Callable[..., dict], tokenizer: Any, data_args: Any,
                             output_dir: str, is_main: bool, *, image_tokens: Optional[int] = None,
                             stage: Optional[str] = None, progress: Optional[bool] = None) -> dict:
    """``original_make(tokenizer=, data_args=)`` (upstream's make_supervised_data_module) with the
    corpus checked first (see the module docstring). ``image_tokens``: patch tokens per image
    (upstream's ``CLIPVisionTower.num_patches``), used to find captions that the sequence limit cuts to nothing;
    None = ``data_args.image_tokens`` if set, else only the image placeholder is counted.
    ``stage``: 'pretrain' | 'instruct' (default: from upstream's conversation template)."""
    s = data_check_settings(data_args)
    mode, policy = s["data_check"], s["data_check_policy"]
    validate_settings(mode, policy)
    module = original_make(tokenizer=tokenizer, data_args=data_args)
    dataset = module["train_dataset"]
    guard_log = runtime_log_path(output_dir)
    module["data_collator"] = FlaggingCollator(module["data_collator"])
    if mode == "off":
        module["train_dataset"] = GuardedDataset(dataset, policy, log_path=guard_log)
        return module

    stage = stage or data_stage()
    if image_tokens is None:
        image_tokens = int(getattr(data_args, "image_tokens", 0) or 0)
    records = getattr(dataset, "list_data_dict", None)
    if records is None:
        records = load_records(data_args.data_path)
    image_folder = getattr(data_args, "image_folder", None)
    report = run_data_check(records, data_path=data_args.data_path, image_folder=image_folder, output_dir=output_dir,
                            is_main=is_main, settings=s, tokenizer=tokenizer,
                            model_max_length=getattr(tokenizer, "model_max_length", None), image_tokens=image_tokens,
                            stage=stage, progress=progress)
    if report.bad:
        dataset = _keep_only(original_make, tokenizer, data_args, dataset, records, report, output_dir, is_main)
        module["train_dataset"] = dataset
    note_skipped(report, policy, output_dir, is_main)
    module["train_dataset"] = GuardedDataset(module["train_dataset"], policy, log_path=guard_log)
    return module


def _keep_only(original_make, tokenizer, data_args, dataset, records, report: CheckReport,
               output_dir: str, is_main: bool):
    kept = [records[i] for i in report.good_indices]
    if hasattr(dataset, "list_data_dict"):
        dataset.list_data_dict = kept
        return dataset
    # a dataset class without list_data_dict: rebuild it from a filtered copy of the data file
    path = os.path.join(output_dir, CHECKED_DATA_NAME)
    write_json_atomic(path, kept)  # every rank writes the same content (atomic replace)
    args = copy.copy(data_args)
    args.data_path = path
    return original_make(tokenizer=tokenizer, data_args=args)["train_dataset"]
