"""The stale-lock rule for DeepSpeed's JIT-built op (llava_contrastive.training.jit_ops), on a fake clock,
and the guard's release when its holder is killed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llava_contrastive.training import jit_ops


class FakeTime:
    def __init__(self, now: float = 1_000_000.0):
        self.now, self.slept = now, 0.0
        self.on_sleep = None

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        assert s > 0
        self.now += s
        self.slept += s
        if self.on_sleep:
            self.on_sleep()


def _lock(tmp_path: Path, mtime: float) -> Path:
    lock = tmp_path / "lock"
    lock.touch()
    os.utime(lock, (mtime, mtime))
    return lock


def test_an_old_lock_is_removed_at_once_and_said(tmp_path):
    t, said = FakeTime(), []
    lock = _lock(tmp_path, t.now - 3600)
    assert jit_ops.clear_stale_lock(tmp_path, 120, said.append, t.clock, t.sleep) is True
    assert not lock.exists() and t.slept == 0
    assert len(said) == 1 and "removed the stale lock" in said[0] and str(lock) in said[0] and "3600 s old" in said[0]


def test_no_lock_is_a_no_op(tmp_path):
    t, said = FakeTime(), []
    assert jit_ops.clear_stale_lock(tmp_path, 120, said.append, t.clock, t.sleep) is False
    assert said == [] and t.slept == 0


def test_a_young_lock_released_by_its_builder_is_waited_for_not_removed(tmp_path):
    t, said = FakeTime(), []
    lock = _lock(tmp_path, t.now - 10)
    t.on_sleep = lambda: lock.unlink() if t.slept >= 3 else None  # the builder finishes 3 s later
    assert jit_ops.clear_stale_lock(tmp_path, 120, said.append, t.clock, t.sleep) is False
    assert t.slept == 3
    assert len(said) == 1 and "waiting for" in said[0] and jit_ops.GRACE_ENV in said[0]


def test_a_young_lock_that_stays_is_removed_when_it_reaches_the_grace(tmp_path):
    t, said = FakeTime(), []
    lock = _lock(tmp_path, t.now - 100)
    assert jit_ops.clear_stale_lock(tmp_path, 120, said.append, t.clock, t.sleep) is True
    assert not lock.exists() and t.slept == pytest.approx(20)
    assert [m.split(":")[1].split()[0] for m in said] == ["waiting", "removed"]


def test_a_lock_from_the_future_ends_after_grace_seconds_of_waiting(tmp_path):
    t, said = FakeTime(), []
    lock = _lock(tmp_path, t.now + 10_000)  # clock skew between hosts on a shared file system
    assert jit_ops.clear_stale_lock(tmp_path, 30, said.append, t.clock, t.sleep) is True
    assert not lock.exists() and t.slept == pytest.approx(30)


@pytest.mark.parametrize("argv,expected", [
    (["--deepspeed", "scripts/zero2.json", "--seed", "1"], True),
    (["--deepspeed=scripts/zero3.json"], True),
    (["--seed", "1"], False),
    (["--deepspeed", "--seed", "1"], False),
    (["--deepspeed="], False),
    (["--deepspeed"], False),
])
def test_deepspeed_requested(argv, expected):
    assert jit_ops.deepspeed_requested(argv) is expected


def test_grace_from_the_environment():
    assert jit_ops.grace_seconds({}) == jit_ops.DEFAULT_GRACE_S
    assert jit_ops.grace_seconds({jit_ops.GRACE_ENV: "7.5"}) == 7.5
    with pytest.raises(ValueError, match=jit_ops.GRACE_ENV):
        jit_ops.grace_seconds({jit_ops.GRACE_ENV: "soon"})


def test_the_guard_excludes_others_and_is_released_when_its_holder_is_killed(tmp_path):
    build_dir = tmp_path / "ext" / "deepspeed_shm_comm"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from llava_contrastive.training.jit_ops import build_guard\n"
         f"with build_guard(Path({str(build_dir)!r})):\n    print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        assert holder.stdout.readline().strip() == "held"
        acquired = threading.Event()

        def take():
            with jit_ops.build_guard(build_dir):
                acquired.set()

        threading.Thread(target=take, daemon=True).start()
        assert not acquired.wait(1.0), "the guard let a second holder in"
        holder.send_signal(signal.SIGKILL)  # dies holding it, as a killed build does
        assert acquired.wait(30), "the guard of a killed holder was not released"
    finally:
        holder.kill()
        holder.wait()
