"""``memory_read_off(model)``: a context manager that switches every head's memory read off (A = A_dot) and restores β exactly.

Eq. 10 mixes A = sigmoid(β)·A_mem + (1 − sigmoid(β))·A_dot per head; with β = −inf the gate is exactly 0,
so each token sees its own segment only (the memory is still written, never read). The gates are
copied before and written back bit for bit afterwards, also when the body raises.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def memory_read_off(model) -> Iterator[None]:
    """Within the block, ``model`` ignores its compressive memory (for ``eval ppl/passkey --no-memory``)."""
    gates = model.gate_parameters()
    saved = [p.detach().clone() for p in gates]
    try:
        with torch.no_grad():
            for p in gates:
                p.fill_(float("-inf"))  # sigmoid(-inf) == 0 exactly, in every float dtype
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(gates, saved):
                p.copy_(s)
