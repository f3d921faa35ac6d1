"""The one command line: verbs, --host dispatch, exit codes, the console script."""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys

import pytest

from llava_contrastive import cli


def test_every_verb_resolves_to_an_entry_with_main():
    for verb, hosts in cli.VERBS.items():
        assert verb in cli.SUMMARY
        for host in hosts:
            module = cli.resolve(verb, host or None)
            assert callable(getattr(importlib.import_module(module), "main")), module


def test_host_choice():
    assert cli.resolve("train", None) == "llava_contrastive.hosts.llava.train"
    assert cli.resolve("train", "hf") == "llava_contrastive.hosts.hf.train"
    assert cli.split_host(["--a", "1", "--host", "hf", "--b"]) == ("hf", ["--a", "1", "--b"])
    assert cli.split_host(["--host=llava"]) == ("llava", [])
    with pytest.raises(ValueError, match="not offered by --host llava"):
        cli.resolve("convert", "llava")
    with pytest.raises(ValueError, match="unknown verb"):
        cli.resolve("trian", None)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llava_contrastive", *args], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))


def test_help_version_and_user_errors():
    out = _run("--help")
    assert out.returncode == 0 and all(v in out.stdout for v in cli.VERBS)
    out = _run("--version")
    assert out.returncode == 0 and out.stdout.startswith("llava_contrastive ")
    out = _run("trian")
    assert out.returncode == 2 and "unknown verb 'trian'" in out.stderr and "Traceback" not in out.stderr
    out = _run("holdout", "--help")
    assert out.returncode == 0 and "--num_heldout" in out.stdout


def test_console_script_is_installed():
    exe = shutil.which("llava-contrastive", path=os.path.dirname(sys.executable))
    assert exe is not None, "pip install -e . installs the llava-contrastive console script"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage: llava-contrastive" in out.stdout
