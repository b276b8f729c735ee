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


def reference_commands() -> list[list[str]]:
    """The README's command-line reference: one argv per command (continuations joined, comments dropped)."""
    import shlex

    block = re.search(r"## Command-line reference\n.*?```bash\n(.*?)```", README.read_text(), re.S)
    assert block, "README lost its command-line reference"
    text = block.group(1).replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in text.splitlines() if line.strip()]


@pytest.mark.slow
def test_readme_cli_reference_runs_as_written(tmp_path):
    """Each command of the reference, in order, in a scratch directory that sees the repository's tests/."""
    import os
    import subprocess
    import sys

    (tmp_path / "tests").symlink_to(README.parent / "tests")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(k, None)
    commands = reference_commands()
    assert {argv[0] for argv in commands} == {"infinitrain"}
    assert len(commands) >= 15
    for argv in commands:
        res = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{' '.join(argv)} -> exit {res.returncode}\n{res.stderr[-3000:]}"
    assert (tmp_path / "models" / "demo" / "model.safetensors").exists()
    assert (tmp_path / "evals" / "passkey" / "passkey.json").exists()
