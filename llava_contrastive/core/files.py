"""Atomic file writes (pure python): write into a temporary file beside the target, flush and
fsync it, then ``os.replace`` it into place, so a reader never sees half a file and a crash
(or a full disk) leaves the previous version intact."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable, Optional


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp_path)`` writes the content to a temporary path; it is then renamed to ``path``.
    On any error the temporary file is removed and the error re-raised."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(text: str, path: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def atomic_write_json(path: str, obj: Any, indent: Optional[int] = 2, sort_keys: bool = False) -> None:
    atomic_write_text(json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n", path)
