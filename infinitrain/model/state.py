"""``ModelState``: the streaming state of a whole model, one entry per layer, passed in and returned by every call.

Infini layers hold their memory (M, z), the keys/values of the unfinished segment and (with ``token_shift``) the last
input token (``AttnState``); MEGALODON layers their norm statistics, CEMA state and chunk cache (``MegalodonState``).
Its own module so that generation and the model share it without importing each other.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from infinitrain.model.megalodon import MegalodonState
from infinitrain.ops.memory import AttnState


def _detach_attn(s: AttnState) -> AttnState:
    return AttnState(type(s.mem)(s.mem.M.detach(), s.mem.z.detach()), s.k.detach(), s.v.detach(),
                     None if s.keep is None else s.keep, last=None if s.last is None else s.last.detach())


class ModelState(NamedTuple):
    """Per-layer streaming state. Infini: each layer's memory (M, z), the keys/values of the unfinished segment and
    (with ``token_shift``) the layer's last input token. MEGALODON: norm statistics, CEMA state, chunk cache."""

    layers: tuple[AttnState | MegalodonState, ...]

    def detach(self) -> "ModelState":
        """Cut the gradient at a truncated-BPTT window boundary (the values are kept)."""
        return ModelState(tuple(s.detach() if isinstance(s, MegalodonState) else _detach_attn(s) for s in self.layers))

    @property
    def tokens_in_segment(self) -> int:
        return self.layers[0].k.shape[2]

    def row(self, b: int) -> "ModelState":
        """Row b of the batch, (1, ...) in every tensor (views; the segment buffer is left behind, so that the row
        copies before it appends)."""
        if isinstance(self.layers[0], MegalodonState):
            return ModelState(tuple(s.row(b) for s in self.layers))

        def pick(t):
            return None if t is None else t[b:b + 1]

        return ModelState(tuple(AttnState(type(s.mem)(pick(s.mem.M), pick(s.mem.z)), pick(s.k), pick(s.v),
                                          pick(s.keep), pick(s.k_rot), None, pick(s.last)) for s in self.layers))

    @staticmethod
    def cat(states: "list[ModelState | None]") -> "ModelState":
        """Rows of several states, one batch (each holding the same number of tokens of its unfinished segment).
        None is a stream not started (zeros shaped like another row: only with no unfinished tokens). A row without
        a keep mask keeps every token; the rotated-key cache is kept only if every row has it."""
        ref = next(s for s in states if s is not None)
        if isinstance(ref.layers[0], MegalodonState):
            return ModelState(tuple(MegalodonState.cat([None if s is None else s.layers[i] for s in states])
                                    for i in range(len(ref.layers))))
        states = [s if s is not None else ModelState(tuple(AttnState(
            type(r.mem)(torch.zeros_like(r.mem.M), torch.zeros_like(r.mem.z)), r.k.new_zeros(r.k.shape),
            r.v.new_zeros(r.v.shape), None, last=None if r.last is None else torch.zeros_like(r.last))
            for r in ref.layers))
            for s in states]

        def join(ts: list, fill=None):
            if all(t is None for t in ts) or (fill is None and any(t is None for t in ts)):
                return None
            return torch.cat([fill(like) if t is None else t for t, like in zip(ts, rows_k)])

        layers = []
        for per_row in zip(*(st.layers for st in states)):
            rows_k = [s.k for s in per_row]
            layers.append(AttnState(
                type(per_row[0].mem)(torch.cat([s.mem.M for s in per_row]), torch.cat([s.mem.z for s in per_row])),
                torch.cat(rows_k), torch.cat([s.v for s in per_row]),
                join([s.keep for s in per_row], lambda k: torch.ones(1, k.shape[2], dtype=torch.bool, device=k.device)),
                join([s.k_rot for s in per_row]), None, join([s.last for s in per_row])))
        return ModelState(tuple(layers))
