"""The README runs as written: its Python example (chunked == one call) and its command-line reference."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_model_example_runs_and_chunking_is_exact():
    block = re.search(r"## The model in Python\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert block, "README lost its Python example"
    scope: dict = {}
    exec(compile(block.group(1), str(README), "exec"), scope)
    full = scope["model"](scope["ids"]).logits
    chunked = torch.cat([scope["a"].logits, scope["b"].logits], 1)
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)
    assert len(scope["new_tokens"][0]) == 20
    assert scope["out"].logits.shape == (2, 256, 512)


def reference_block() -> str:
    """The README's command-line reference, as written."""
    block = re.search(r"## Command-line reference\n.*?```bash\n(.*?)```", README.read_text(), re.S)
    assert block, "README lost its command-line reference"
    return block.group(1)


@pytest.mark.slow
def test_readme_cli_reference_runs_as_written_and_writes_nothing_into_the_checkout(tmp_path):
    """The block through bash from the repository root, stopping at the first failing command; its scratch
    directory (mktemp -d, under TMPDIR) gets every output and the checkout none."""
    import os
    import subprocess
    import sys

    block = reference_block()
    commands = [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    assert commands[0].startswith("REPO=$PWD; cd \"$(mktemp -d)\"")
    assert all(c.startswith("infinitrain ") for c in commands[1:]) and len(commands) >= 16
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(k, None)
    before = _untracked()
    res = subprocess.run(["bash", "-euxo", "pipefail", "-c", block], cwd=README.parent, env=env, capture_output=True,
                         text=True, timeout=1800)
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stderr[-4000:]}"
    (scratch,) = [d for d in tmp_path.iterdir() if (d / "tok.json").exists()]  # others: torch's and DeepSpeed's
    assert (scratch / "models" / "demo" / "model.safetensors").exists()
    assert (scratch / "evals" / "passkey" / "passkey.json").exists()
    assert _untracked() == before  # nothing new in the checkout


def _untracked() -> set[str]:
    import subprocess

    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=README.parent,
                         capture_output=True, text=True)
    return set(out.stdout.splitlines()) if out.returncode == 0 else set()
