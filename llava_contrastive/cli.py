"""One command line: ``llava-contrastive <verb> [--host llava|hf] [flags]``
(= ``python -m llava_contrastive <verb> ...``).

Each verb runs one entry module's ``main(argv) -> int``; ``--host`` picks the upstream LLaVA host
(``llava``, default) or transformers' native LLaVA (``hf``) where both offer the verb. Flags after
the verb are the entry's own (``llava-contrastive train --help``).
"""
from __future__ import annotations

import importlib
import sys
from typing import Dict, List, Optional, Sequence, Tuple

# verb -> {host: module}; "" = host-agnostic
VERBS: Dict[str, Dict[str, str]] = {
    "train": {"llava": "llava_contrastive.hosts.llava.train", "hf": "llava_contrastive.hosts.hf.train"},
    "finetune": {"llava": "llava_contrastive.hosts.llava.train", "hf": "llava_contrastive.hosts.hf.finetune"},
    "eval": {"llava": "llava_contrastive.hosts.llava.eval", "hf": "llava_contrastive.hosts.hf.eval"},
    "vqa": {"llava": "llava_contrastive.hosts.llava.vqa", "hf": "llava_contrastive.hosts.hf.vqa"},
    "convert": {"hf": "llava_contrastive.hosts.hf.convert"},
    "image-features": {"llava": "llava_contrastive.hosts.llava.image_features"},
    "text-cache": {"llava": "llava_contrastive.hosts.llava.text_cache"},
    "data-check": {"": "llava_contrastive.data.check"},
    "holdout": {"": "llava_contrastive.data.holdout"},
    "ablate": {"": "llava_contrastive.dev.ablate"},
    "bench": {"": "llava_contrastive.dev.bench"},
    "tiny": {"": "llava_contrastive.dev.tiny"},
    "score": {"": "llava_contrastive.evaluation.score"},
    "reproduce": {"": "llava_contrastive.evaluation.reproduce"},
    "plot": {"": "llava_contrastive.evaluation.plot"},
    "headline": {"": "llava_contrastive.evaluation.headline"},
}
SUMMARY = {
    "train": "stage 1: NTP + contrastive projector alignment (upstream's train flags + --contrastive_*)",
    "finetune": "stage 2 instruction tuning (llava: upstream's finetune flags, --version v1; hf: LoRA/QLoRA)",
    "eval": "held-out image-text alignment report of a stage-1 projector",
    "vqa": "answer a VQA question file (upstream model_vqa_loader's flags and answers format), CPU or GPU",
    "convert": "projector keys upstream <-> native, or build a native LLaVA checkpoint (hf)",
    "text-cache": "precompute --contrastive_text_cache (prompted-LLM caption embeddings, resumable, N ranks)",
    "image-features": "projected image features with upstream's own code (cross-host checks)",
    "data-check": "check a LLaVA JSON corpus and its images before training",
    "holdout": "carve a held-out split with unseen captions",
    "ablate": "contrastive-settings ablation on the tiny assets",
    "bench": "cost of the contrastive term per training step",
    "tiny": "build the tiny offline models and data",
    "score": "score a benchmark answers file (pope mme mmbench gqa textqa) -> metrics JSON",
    "reproduce": "two-stage reproduction: NTP-only vs joint stage 1 -> stage 2 -> benchmarks, with intervals",
    "plot": "training curves of one or more runs from trainer_state.json alone (no model)",
    "headline": "write / check the README's headline numbers from the default run's report.json",
}


def usage() -> str:
    lines = ["usage: llava-contrastive <verb> [--host llava|hf] [flags]   (llava-contrastive <verb> --help)", "",
             "verbs:"]
    for verb, hosts in VERBS.items():
        where = "" if "" in hosts else f"  [--host {'|'.join(hosts)}]"
        lines.append(f"  {verb:<15}{SUMMARY[verb]}{where}")
    lines += ["", "llava-contrastive --version   versions of this plugin and of the host packages found"]
    return "\n".join(lines)


def split_host(argv: Sequence[str]) -> Tuple[Optional[str], List[str]]:
    """``--host X`` / ``--host=X`` anywhere in argv -> (X, the rest)."""
    rest: List[str] = []
    host = None
    it = iter(argv)
    for a in it:
        if a == "--host":
            host = next(it, None)
            if host is None:
                raise ValueError("--host needs a value: llava or hf")
        elif a.startswith("--host="):
            host = a.split("=", 1)[1]
        else:
            rest.append(a)
    return host, rest


def resolve(verb: str, host: Optional[str]) -> str:
    """The entry module of ``verb`` on ``host``; a ValueError names the choices."""
    if verb not in VERBS:
        raise ValueError(f"unknown verb {verb!r}; choose from: {', '.join(VERBS)}")
    hosts = VERBS[verb]
    if "" in hosts:
        if host not in (None, "llava", "hf"):
            raise ValueError(f"--host {host!r}: choose llava or hf")
        return hosts[""]
    host = host or "llava"
    if host not in hosts:
        raise ValueError(f"`{verb}` is not offered by --host {host}; hosts with it: {', '.join(hosts)}")
    return hosts[host]


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        from llava_contrastive import describe_host

        print(describe_host())
        return 0
    verb, rest = argv[0], argv[1:]
    try:
        host, rest = split_host(rest)
        module = resolve(verb, host)
    except ValueError as err:
        sys.stderr.write(f"llava-contrastive: {err}\n\n{usage()}\n")
        return 2
    sys.argv = [f"llava-contrastive {verb}"] + rest
    if verb == "train" and not any(a in ("-h", "--help") for a in rest):  # user errors before torch loads
        from llava_contrastive.training.preflight import run_preflight

        run_preflight(rest, host=host or "llava")
    code = importlib.import_module(module).main(rest)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
