"""`python -m llava_contrastive.vqa [--host llava|hf] ...`: answers files in the format of upstream's
`llava.eval.model_vqa_loader` (same flags), on CPU or GPU, batched and resumable.

The code is in ``llava_contrastive.evaluation.vqa`` (host-agnostic loop) and
``llava_contrastive.hosts.{llava,hf}.vqa`` (model loading and prompts per host).
"""
import importlib
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    from llava_contrastive.cli import resolve, split_host

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        host, rest = split_host(argv)
        module = resolve("vqa", host)
    except ValueError as err:
        sys.stderr.write(f"vqa: {err}\n")
        return 2
    return int(importlib.import_module(module).main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
