"""The layout's invariants: a pure core, nothing printed on import, no test switches in library
code, no dead helpers, no function over 80 lines."""
from __future__ import annotations

import subprocess
import sys

from layering import core_violations, long_functions, modules

BLOCK_HOSTS = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ImportError('layering: ' + name)
sys.meta_path.insert(0, Block())
import pkgutil, importlib, llava_contrastive.core as core
for m in pkgutil.walk_packages(core.__path__, 'llava_contrastive.core.'):
    importlib.import_module(m.name)
print('ok')
"""


def test_core_imports_no_host_library_nor_upper_layer():
    found = {name: core_violations(src, name) for name, src in modules("core").items()}
    assert len(found) >= 10, sorted(found)
    assert not [v for vs in found.values() for v in vs]


def test_layering_check_catches_a_core_module_importing_transformers():
    synthetic = "import torch\n\ndef f():\n    from transformers import AutoModel\n    return AutoModel\n"
    assert core_violations(synthetic, "llava_contrastive.core.synthetic") == [
        "llava_contrastive.core.synthetic imports transformers",
        "llava_contrastive.core.synthetic imports transformers.AutoModel"]
    upward = "from ..hosts.llava import model\n"
    assert core_violations(upward, "llava_contrastive.core.synthetic") == [
        "llava_contrastive.core.synthetic imports llava_contrastive.hosts.llava (outside llava_contrastive.core)",
        "llava_contrastive.core.synthetic imports llava_contrastive.hosts.llava.model (outside llava_contrastive.core)"]


def test_core_imports_at_run_time_with_host_libraries_blocked():
    code = BLOCK_HOSTS.format(blocked={"transformers", "llava", "peft", "deepspeed", "bitsandbytes"})
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_nothing_printed_on_import():
    code = ("import llava_contrastive, llava_contrastive.cli, llava_contrastive.losses, llava_contrastive.metrics, "
            "llava_contrastive.core.head, llava_contrastive.evaluation.alignment")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == "" and out.stderr == ""


def test_no_test_switches_and_no_overlong_functions_in_the_package():
    sources = modules()
    assert not [n for n, s in sources.items() if "FOR_TESTS" in s]
    assert long_functions(sources.items()) == []
