"""The README's Python example runs as written and its claims hold (chunked == one call)."""

from __future__ import annotations

import re
from pathlib import Path

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
