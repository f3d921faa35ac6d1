"""The pure-core layering check under stack M (transformers 5.x): see tests/layering.py."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from layering import core_violations, modules  # noqa: E402


def test_core_imports_no_host_library_nor_upper_layer_stack_m():
    found = [v for name, src in modules("core").items() for v in core_violations(src, name)]
    assert found == []
