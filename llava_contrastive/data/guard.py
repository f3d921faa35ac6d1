"""The host-agnostic half of the data check in training, shared by both hosts (no ``llava`` and no
``transformers`` import). The check itself is ``data/check.py``; this module runs it in a training
job and guards the dataset afterwards:

* ``run_data_check``: the check runs ONCE, on global rank 0; the other ranks wait (a gloo broadcast
  with a long timeout, so a full check of 558k images does not trip the NCCL watchdog) and receive
  the same report. ``OUTPUT_DIR/data_check_report.json`` is written by the main process. Under
  ``--data_check_policy error`` every rank raises ``DataCheckError`` with the report's summary
  (records, reasons, the fix) before a trainer exists: no hang, no checkpoint.
* ``note_skipped``: under ``skip`` the host keeps exactly ``report.good_indices``; the skipped
  records are listed in ``OUTPUT_DIR/skipped_records.json``.
* ``GuardedDataset``: during training a sample that fails to load (a file deleted or corrupted
  after the check) is flagged (``BAD_RECORD_KEY``, policy error: the next loadable record stands in
  so the batch is well formed, and the trainer stops all ranks together at that step after saving a
  resumable checkpoint) or, under ``skip``, logged, counted (``runtime_skips``, also appended to
  ``OUTPUT_DIR/runtime_skipped_records.jsonl``) and replaced by the next loadable record, up to 1% of
  the records + 10, beyond which ``DataCheckError`` is raised.
* ``FlaggingCollator``: moves the flags of a micro-batch into ``batch["_bad_records"]``, which the
  trainer pops and all-reduces (``nonfinite.agree_on_step``).

A host supplies the records, the tokenizer/limits and, for ``GuardedDataset``, a dataset whose
records are ``list_data_dict`` (upstream's LazySupervisedDataset) or ``records`` and whose image
folder is ``data_args.image_folder`` or ``image_folder``.
"""
from __future__ import annotations

import datetime
import json
import logging
import multiprocessing
import os
from typing import Any, Callable, Dict, Optional, Sequence

from torch.utils.data import Dataset

from llava_contrastive.data.check import (CheckReport, DataCheckArguments, DataCheckError, check_records, classify_exception,
                         default_cache_path, validate_settings, write_json_atomic)

logger = logging.getLogger("llava_contrastive")

REPORT_NAME = "data_check_report.json"
SKIPPED_NAME = "skipped_records.json"
CHECKED_DATA_NAME = "train_checked.json"
RUNTIME_SKIPS_NAME = "runtime_skipped_records.jsonl"
BAD_RECORD_KEY = "_bad_record"  # sample key set by GuardedDataset under policy error
BAD_RECORDS_KEY = "_bad_records"  # batch key read (and removed) by the trainer
WAIT_TIMEOUT_ENV = "LLAVA_CONTRASTIVE_DATA_CHECK_TIMEOUT"  # seconds the other ranks wait for rank 0
SETTING_NAMES = ("data_check", "data_check_policy", "data_check_workers", "data_check_cache")


class FlaggingCollator:
    """A collator, plus ``batch["_bad_records"]`` listing records of the micro-batch that failed to
    load under --data_check_policy error."""

    def __init__(self, collator: Callable):
        self.collator = collator

    def __call__(self, instances):
        bad = [x.pop(BAD_RECORD_KEY) for x in instances if isinstance(x, dict) and BAD_RECORD_KEY in x]
        batch = self.collator(instances)
        if bad:
            batch[BAD_RECORDS_KEY] = bad
        return batch

    def __getattr__(self, name):
        return getattr(self.__dict__["collator"], name)


def data_check_settings(args: Any) -> Dict[str, Any]:
    """The --data_check* flags of ``args`` (DataCheckArguments defaults when absent)."""
    defaults = DataCheckArguments()
    return {name: getattr(args, name, getattr(defaults, name)) for name in SETTING_NAMES}


def runtime_log_path(output_dir: Optional[str]) -> Optional[str]:
    return os.path.join(output_dir, RUNTIME_SKIPS_NAME) if output_dir else None


def _dist():
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def check_once(run: Callable[[], CheckReport], *, write_report: Callable[[CheckReport], None],
               is_main: bool) -> CheckReport:
    """Run ``run`` on global rank 0 (or here, single process) and give every rank its report."""
    dist = _dist()
    if dist is None:
        report = run()
        if is_main:
            write_report(report)
        return report

    rank = dist.get_rank()
    timeout = datetime.timedelta(seconds=float(os.environ.get(WAIT_TIMEOUT_ENV, 24 * 3600)))
    try:  # a CPU group of its own: its own (long) timeout, no CUDA device needed for the object
        group = dist.new_group(backend="gloo", timeout=timeout)
    except Exception:  # pragma: no cover - no gloo in this build
        group = None
    error: Optional[BaseException] = None
    payload: Dict[str, Any] = {}
    if rank == 0:
        try:
            report = run()
            payload = {"report": report.to_json()}
            if is_main:
                write_report(report)
        except BaseException as e:  # every rank must still reach the broadcast
            error = e
            payload = {"error": f"{type(e).__name__}: {e}"}
    box = [payload]
    dist.broadcast_object_list(box, src=0, group=group)
    if group is not None:
        try:
            dist.destroy_process_group(group)
        except Exception:  # pragma: no cover
            pass
    payload = box[0]
    if error is not None:
        raise error
    if "error" in payload:
        raise DataCheckError(f"the data check failed on rank 0: {payload['error']}")
    report = CheckReport.from_json(payload["report"])
    if is_main and rank != 0:  # e.g. the local main process of another node
        write_report(report)
    return report


def run_data_check(records: Sequence[Any], *, data_path: str, image_folder: Optional[str], output_dir: Optional[str],
                   is_main: bool, settings: Dict[str, Any], tokenizer: Any = None,
                   model_max_length: Optional[int] = None, image_tokens: int = 0, stage: str = "pretrain",
                   progress: Optional[bool] = None) -> CheckReport:
    """Check ``records`` once (rank 0, broadcast), write ``OUTPUT_DIR/data_check_report.json`` and apply
    the policy's first half: under ``error`` every rank raises ``DataCheckError`` (the summary names
    the first bad records, their reasons and the fix); under ``skip`` with no good record left, too.
    The caller then keeps ``report.good_indices`` and calls ``note_skipped``. ``settings``:
    ``data_check_settings(args)``; mode ``off`` is the caller's business (no check at all)."""
    mode, policy = settings["data_check"], settings["data_check_policy"]
    validate_settings(mode, policy)
    if model_max_length is not None and model_max_length > 10 ** 8:  # transformers' "no limit" sentinel
        model_max_length = None
    cache = settings["data_check_cache"] or default_cache_path(data_path, image_folder, mode, stage)

    def run() -> CheckReport:
        return check_records(records, image_folder, mode=mode, tokenizer=tokenizer, model_max_length=model_max_length,
                             image_tokens=image_tokens, stage=stage, workers=int(settings["data_check_workers"]),
                             cache_path=cache, progress=is_main if progress is None else progress)

    def write_report(report: CheckReport) -> None:
        if not output_dir:
            return
        out = report.to_json()
        out.update(data_path=os.path.abspath(data_path), policy=policy, cache=cache)
        write_json_atomic(os.path.join(output_dir, REPORT_NAME), out, indent=1)

    report = check_once(run, write_report=write_report, is_main=is_main)
    if report.bad and policy == "error":  # every rank raises, before the trainer exists
        raise DataCheckError(report.summary(), report=report)
    if is_main:
        logger.info("%s", report.summary(max_items=20 if report.bad else 0))
    if report.bad and not report.good_indices:
        raise DataCheckError("no good record left to train on.\n" + report.summary(), report=report)
    return report


def note_skipped(report: CheckReport, policy: str, output_dir: Optional[str], is_main: bool) -> None:
    """After the host dropped the bad records: log them and, under ``skip``, list them in
    ``OUTPUT_DIR/skipped_records.json`` (an empty list when none was bad)."""
    if report.bad and is_main:
        logger.warning("data check: skipping %d of %d records (%s); list in %s",
                       len(report.bad), report.n_records,
                       ", ".join(f"{r} {c}" for r, c in sorted(report.counts_by_reason.items())),
                       os.path.join(output_dir or "", SKIPPED_NAME))
    if policy == "skip" and is_main and output_dir:
        skipped = [{"id": b.id, "image": b.image, "reason": b.reason, "detail": b.detail, "index": b.index}
                   for b in report.bad]
        write_json_atomic(os.path.join(output_dir, SKIPPED_NAME), skipped, indent=1)


# ----------------------------------------------------------------------------- runtime guard


class _Counter:
    """A count shared by the DataLoader worker processes (a plain int when that is impossible)."""

    def __init__(self):
        try:
            self._value = multiprocessing.Value("q", 0)
        except Exception:  # pragma: no cover - no shared memory / semaphores here
            self._value = None
        self._local = 0

    def add(self, n: int = 1) -> int:
        if self._value is None:
            self._local += n
            return self._local
        with self._value.get_lock():
            self._value.value += n
            return self._value.value

    @property
    def value(self) -> int:
        return self._local if self._value is None else int(self._value.value)

    def __getstate__(self):
        from multiprocessing import context

        if self._value is not None and context.get_spawning_popen() is None:
            return {"_value": None, "_local": self.value}  # copied outside process spawning: a snapshot
        return self.__dict__

    def __setstate__(self, state):
        self.__dict__.update(state)


def _records_of(dataset: Any):
    records = getattr(dataset, "list_data_dict", None)
    return records if records is not None else getattr(dataset, "records", None)


def _image_folder_of(dataset: Any) -> Optional[str]:
    folder = getattr(getattr(dataset, "data_args", None), "image_folder", None)
    return folder if folder is not None else getattr(dataset, "image_folder", None)


class GuardedDataset(Dataset):
    """Wraps a record dataset (attributes such as ``lengths``, ``modality_lengths``,
    ``list_data_dict``, ``data_args``, ``records`` are the wrapped dataset's): a sample that fails to
    load is flagged naming it (policy error) or replaced by the next loadable record (skip)."""

    def __init__(self, dataset: Any, policy: str = "error", *, max_failures: Optional[int] = None,
                 log_path: Optional[str] = None):
        self.dataset = dataset
        self.policy = policy
        self.max_failures = int(0.01 * len(dataset)) + 10 if max_failures is None else int(max_failures)
        self.log_path = log_path
        self._skips = _Counter()
        self._failed: set = set()  # indices known bad in this process

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("dataset", "_skips", "_failed"):
            raise AttributeError(name)
        inner = self.__dict__.get("dataset")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    @property
    def list_data_dict(self):
        return self.dataset.list_data_dict

    @list_data_dict.setter
    def list_data_dict(self, value):
        self.dataset.list_data_dict = value

    @property
    def runtime_skips(self) -> int:
        """Samples that failed to load during training and were replaced (all worker processes)."""
        return self._skips.value

    def _describe(self, i: int) -> Dict[str, Any]:
        rec: Any = None
        try:
            rec = _records_of(self.dataset)[i]
        except Exception:
            pass
        rid = rec.get("id") if isinstance(rec, dict) else None
        image = rec.get("image") if isinstance(rec, dict) else None
        path = None
        if isinstance(image, str):
            folder = _image_folder_of(self.dataset)
            path = os.path.join(folder, image) if folder else image
        return {"index": i, "id": rid, "image": image, "path": path}

    def __getitem__(self, i):
        if not isinstance(i, int):
            return self.dataset[i]
        n = len(self.dataset)
        j = i
        failures = []
        for _ in range(min(n, self.max_failures + 1)):
            if j not in self._failed:
                try:
                    sample = self.dataset[j]
                except Exception as exc:
                    failures.append(self._failed_at(j, exc, requested=i))
                else:
                    if failures and self.policy != "skip":
                        # policy error: the trainer stops all ranks together at this step (after a
                        # resumable checkpoint) instead of one rank dying inside its DataLoader
                        sample = dict(sample)
                        sample[BAD_RECORD_KEY] = "; ".join(failures)
                    return sample
            j = (j + 1) % n
        raise DataCheckError(f"no loadable record found from index {i} on (tried {min(n, self.max_failures + 1)} "
                             f"records); the corpus changed under the run: re-run the data check")

    def _failed_at(self, j: int, exc: Exception, requested: int) -> str:
        """Log and remember a record that failed to load; returns its description."""
        if isinstance(exc, DataCheckError):
            raise exc
        reason, detail = classify_exception(exc)
        d = self._describe(j)
        where = f"record #{j} id={d['id']!r} image {d['path']!r}"
        if self.policy != "skip":
            self._failed.add(j)
            return f"{where}: {reason} ({detail})"
        self._failed.add(j)
        count = self._skips.add(1)
        logger.warning("data: %s failed to load during training: %s (%s); using the next record instead "
                       "[%d runtime skips, limit %d]", where, reason, detail, count, self.max_failures)
        if self.log_path:
            line = json.dumps({"index": j, "id": d["id"], "image": d["image"], "reason": reason, "detail": detail,
                               "requested_index": requested}, default=str)
            try:
                with open(self.log_path, "a", encoding="utf-8") as f:
                    f.write(line + "\n")
            except OSError:
                pass
        if count > self.max_failures:
            raise DataCheckError(
                f"{count} records failed to load during training, more than the limit of {self.max_failures} "
                f"(1% of {len(self.dataset)} + 10): the corpus changed under the run (last: {where}: {reason}). "
                f"Re-run the data check (--data_check full) and fix the files") from exc
        return f"{where}: {reason} ({detail})"
