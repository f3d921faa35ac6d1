"""DeepSpeed's JIT-built op without the silent hang a killed build leaves behind.

When a process group starts, DeepSpeed builds its CPU communication op (``deepspeed_shm_comm``) with
torch's JIT extension loader (40-65 s on 2 cores, once per build directory). Torch serialises builders
with a bare ``lock`` file in the op's build directory and waits, without end and without a word, while
it exists. A process killed while it holds the file (Ctrl-C during the build, a scheduler's time limit,
a test timeout) leaves it behind, and from then on every DeepSpeed run hangs at start-up.

``prepare_deepspeed_ops`` runs in every rank of a ``--deepspeed`` run before DeepSpeed starts. Under an
advisory lock of its own (``fcntl``: the OS releases it when its holder dies) it removes a torch lock
older than ``grace`` seconds, then loads the op; DeepSpeed's own load later in the process returns the
loaded module. A lock younger than ``grace`` is waited for (a foreign process may be building).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

GRACE_ENV = "LLAVA_CONTRASTIVE_JIT_LOCK_GRACE"
DEFAULT_GRACE_S = 120.0
COMM_OP_BUILDER = "ShareMemCommBuilder"  # what deepspeed.comm.torch.build_shm_op loads


def deepspeed_requested(argv) -> bool:
    """True when the command line names a DeepSpeed config (``--deepspeed X`` or ``--deepspeed=X``)."""
    args = list(argv)
    for i, a in enumerate(args):
        if a.startswith("--deepspeed="):
            return bool(a.split("=", 1)[1])
        if a == "--deepspeed":
            return i + 1 < len(args) and not args[i + 1].startswith("--")
    return False


def grace_seconds(environ=os.environ) -> float:
    raw = environ.get(GRACE_ENV, "")
    try:
        return float(raw) if raw else DEFAULT_GRACE_S
    except ValueError:
        raise ValueError(f"{GRACE_ENV}={raw!r} is not a number of seconds") from None


def clear_stale_lock(build_dir: Path, grace: float, log: Callable[[str], None],
                     clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep) -> bool:
    """Waits while ``build_dir/lock`` is younger than ``grace`` s; removes it once older. True if removed.
    Call it holding ``build_guard``: no builder of this process family is then inside torch's lock."""
    lock = Path(build_dir) / "lock"
    waited_msg, start = False, clock()
    while True:
        try:  # a future mtime (clock skew on a shared file system) still ends after `grace` s of waiting
            age = max(clock() - lock.stat().st_mtime, clock() - start)
        except FileNotFoundError:
            return False
        if age >= grace:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            log(f"llava-contrastive: removed the stale lock {lock} ({age:.0f} s old): a process died while "
                f"building this op and torch would have waited for it forever")
            return True
        if not waited_msg:
            log(f"llava-contrastive: waiting for {lock} ({age:.0f} s old; another process may be building the "
                f"op). A lock older than {grace:.0f} s is removed as stale (set {GRACE_ENV} to change).")
            waited_msg = True
        sleep(min(1.0, grace - age))


@contextlib.contextmanager
def build_guard(build_dir: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``<build_dir>.guard``; the OS drops it when the holder exits or dies."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): torch's own lock file only
        yield
        return
    path = Path(build_dir).parent / f".{Path(build_dir).name}.guard"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def torch_build_dir(name: str) -> Path:
    """Where torch's JIT loader builds (and locks) extension ``name``."""
    from torch.utils import cpp_extension

    if hasattr(cpp_extension, "_get_build_directory"):
        return Path(cpp_extension._get_build_directory(name, verbose=False))
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return Path(root) / name


def prepare_deepspeed_ops(grace: Optional[float] = None, log: Optional[Callable[[str], None]] = None):
    """Loads the op DeepSpeed's process group start-up loads, clearing a stale build lock first.
    Returns the op module, or None where DeepSpeed would not load it (another accelerator, or the op
    does not build here: DeepSpeed then runs without it too)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    builder = get_accelerator().create_op_builder(COMM_OP_BUILDER)
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    build_dir = torch_build_dir(builder.name)
    with build_guard(build_dir):
        clear_stale_lock(build_dir, grace_seconds() if grace is None else grace, log)
        return builder.load()


def prepare_if_requested(argv) -> None:
    """The entries' call: ``prepare_deepspeed_ops`` when ``--deepspeed`` is given."""
    if deepspeed_requested(argv):
        prepare_deepspeed_ops()


__all__ = ["GRACE_ENV", "DEFAULT_GRACE_S", "deepspeed_requested", "grace_seconds", "clear_stale_lock", "build_guard",
           "torch_build_dir", "prepare_deepspeed_ops", "prepare_if_requested"]
