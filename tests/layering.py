"""Executable invariants of the package layout (used by tests/test_layering.py under stack U and
tests/hf/test_layering_hf.py under stack M)."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterable, List

PACKAGE = Path(__file__).resolve().parents[1] / "llava_contrastive"
FORBIDDEN_IN_CORE = ("transformers", "llava", "peft", "deepspeed", "bitsandbytes", "accelerate")
MAX_FUNCTION_LINES = 80


def imported_modules(source: str, module: str) -> List[str]:
    """Absolute names of every module ``source`` (the text of ``module``) imports, relative imports
    resolved, at any depth (function-local imports count too)."""
    package = module.rsplit(".", 1)[0]
    out: List[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append(name)
            out += [f"{name}.{a.name}" for a in node.names]  # `from pkg import module`
    return out


def core_violations(source: str, module: str) -> List[str]:
    """Imports a core module must not make: host libraries, or anything of this package outside core."""
    bad = []
    for name in imported_modules(source, module):
        top = name.split(".")[0]
        if top in FORBIDDEN_IN_CORE:
            bad.append(f"{module} imports {name}")
        elif top == "llava_contrastive" and name != "llava_contrastive" \
                and not name.startswith("llava_contrastive.core"):
            bad.append(f"{module} imports {name} (outside llava_contrastive.core)")
    return bad


def modules(subpackage: str = "") -> Dict[str, str]:
    """module name -> source for every .py file under the package (or one subpackage)."""
    root = PACKAGE / subpackage if subpackage else PACKAGE
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
            name = ".".join(parts) + ".__init__"
        else:
            name = ".".join(parts)
        out[name] = path.read_text()
    return out


def long_functions(sources: Iterable[tuple[str, str]], limit: int = MAX_FUNCTION_LINES) -> List[str]:
    found = []
    for name, source in sources:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    found.append(f"{name}.{node.name}: {n} lines")
    return found
