"""scripts/lib.sh: the node count of a multi-node launch (the global batch depends on it)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _nodes(tmp_path: Path, hostfile_text: str | None, nnodes: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable)  # lib.sh then installs nothing
    env.pop("NNODES", None)
    env.pop("HOSTFILE", None)
    if hostfile_text is not None:
        (tmp_path / "hostfile").write_text(hostfile_text)
        env["HOSTFILE"] = str(tmp_path / "hostfile")
    if nnodes is not None:
        env["NNODES"] = nnodes
    return subprocess.run(["bash", "-c", f'source "{REPO}/scripts/lib.sh"; resolve_nodes; echo "$NNODES"'],
                          capture_output=True, text=True, env=env, timeout=60)


def test_hostfile_implies_the_node_count(tmp_path):
    out = _nodes(tmp_path, "# two nodes\nnode1 slots=8\n\nnode2 slots=8\n", None)
    assert out.returncode == 0 and out.stdout.strip() == "2", out.stderr


def test_nnodes_disagreeing_with_the_hostfile_is_refused(tmp_path):
    out = _nodes(tmp_path, "node1 slots=8\nnode2 slots=8\n", "1")
    assert out.returncode == 2
    assert "NNODES=1 but HOSTFILE" in out.stderr and "lists 2 host(s)" in out.stderr


def test_defaults_and_agreement(tmp_path):
    assert _nodes(tmp_path, None, None).stdout.strip() == "1"
    assert _nodes(tmp_path, "node1 slots=8\nnode2 slots=8\n", "2").stdout.strip() == "2"
    missing = subprocess.run(["bash", "-c", f'source "{REPO}/scripts/lib.sh"; HOSTFILE=/nonexistent resolve_nodes'],
                             capture_output=True, text=True, env=dict(os.environ, PYTHON=sys.executable), timeout=60)
    assert missing.returncode == 2 and "no such file" in missing.stderr
