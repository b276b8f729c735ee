"""``memory_read_off(model)``: a context manager under which every layer sees only the current segment: each
Infini-attention layer reads an empty memory, each MEGALODON layer starts every chunk with a fresh CEMA state and
fresh timestep-norm statistics (``without_memory`` of each layer says what it drops).

Why an empty memory rather than closing the gates (β = −inf): Eq. 10 is A = g·A_mem + (1 − g)·A_dot, and in a
document's first segment the memory is empty, so A_mem = 0 and the model computes (1 − g)·A_dot. Reading an
empty memory in *every* segment therefore makes each segment behave exactly like a first segment: segment 0 is
bit-identical with and without the switch, and any difference later is what the memory carried from earlier
segments. Forcing g = 0 instead would also change segment 0 (memory-specialist heads, g ≈ 1, would suddenly
pass their raw local attention), overstating the memory's contribution.

How: a forward pre-hook on each such module (``InfiniAttention``, ``MegalodonAttention``) replaces the memory (M, z)
of the incoming state by zeros (and, in a call that opens a segment, drops the token shift's carried token); the
current segment's keys/values are kept. Nothing on the model is mutated and the hooks are removed on exit. The memory
is also written inside a call, so each call must not run past a segment boundary (held tokens + new tokens <= S):
``generate`` with ``prefill_chunk = S`` and ``eval ppl`` call that way, and the hook raises otherwise rather than
silently reading a non-empty memory.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


from infinitrain.model.layers import InfiniAttention
from infinitrain.model.megalodon import MegalodonAttention


def _empty_memory_hook(module: InfiniAttention | MegalodonAttention, args: tuple, kwargs: dict):
    x, state = args[0], (args[1] if len(args) > 1 else kwargs.get("state"))
    held = 0 if state is None else state.k.shape[2]
    if held + x.shape[1] > module.segment_len:
        raise ValueError(f"memory_read_off needs calls that stay inside one segment: {held} held + {x.shape[1]} new "
                         f"tokens > segment {module.segment_len}")
    if state is None:
        return None
    state = module.without_memory(state)
    if len(args) > 1:
        return (x, state, *args[2:]), kwargs
    return args, {**kwargs, "state": state}


@contextmanager
def memory_read_off(model) -> Iterator[None]:
    """Within the block, ``model`` sees nothing before the current segment (``--no-memory``)."""
    handles = [m.register_forward_pre_hook(_empty_memory_hook, with_kwargs=True)
               for m in model.modules() if isinstance(m, (InfiniAttention, MegalodonAttention))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
