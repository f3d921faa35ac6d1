"""llava-contrastive: NTP + contrastive (InfoNCE / SigLIP) projector alignment for LLaVA.

The core (losses, metrics, pooling, distributed gather, temperature, queue) is pure torch.
Host adapters live under ``llava_contrastive.hosts`` and import their VLM code base lazily.
Nothing is printed on import; ``llava-contrastive --version`` names the host packages found.

Layout (imports point down only): ``core/`` pure-torch math; ``training/`` and ``data/`` host-agnostic
run machinery; ``evaluation/`` host-agnostic reports and scoring; ``hosts/<name>/`` one folder per VLM
code base (model, trainer, checkpoint, data, entry points) on top of ``hosts/common.py``; ``dev/``
tiny assets, benchmarks, ablations; ``cli.py`` the one command line.
"""
from __future__ import annotations

__version__ = "0.1.0"

HOST_INSTALL_HINT = (
    "Provide the upstream LLaVA host in this environment, either from your checkout:\n"
    "    pip install -e /path/to/LLaVA --no-deps\n"
    "or from PyPI:\n"
    "    pip install --no-deps llava-torch==1.2.2.post1"
)


def host_versions() -> dict[str, str]:
    """Versions of the host packages visible to this interpreter (without importing them)."""
    import importlib.util
    from importlib import metadata

    found: dict[str, str] = {}
    for dist in ("llava-torch", "llava"):
        try:
            found["llava"] = f"{metadata.version(dist)} ({dist})"
            break
        except metadata.PackageNotFoundError:
            continue
    if "llava" not in found and importlib.util.find_spec("llava") is not None:
        found["llava"] = "source checkout"
    for dist in ("transformers", "torch", "deepspeed"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return found


def describe_host() -> str:
    v = host_versions()
    llava = v.get("llava", "NOT FOUND")
    rest = ", ".join(f"{k} {v[k]}" for k in ("transformers", "torch", "deepspeed") if k in v)
    return f"llava_contrastive {__version__}: host llava {llava}; {rest}"
