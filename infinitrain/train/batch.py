"""What the trainer feeds the model: one ``Sample`` of L tokens, a ``Batch`` of them, and ``collate``.

Shape legend: B micro-batch, L sample length (N segments x S tokens).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Sample(NamedTuple):
    input_ids: Tensor  # (L,) int64
    targets: Tensor  # (L,) int64, the next token of each position
    loss_mask: Tensor  # (L,) bool, False where the target does not count (padding, cross-document)
    doc_start: Tensor  # (L,) bool, True where a document starts (memory resets there)
    sample_id: int
    label: int | None = None  # class id (classification data); read at the one loss_mask position


class Batch(NamedTuple):
    input_ids: Tensor  # (B, L)
    targets: Tensor  # (B, L)
    loss_mask: Tensor  # (B, L) bool
    doc_start: Tensor  # (B, L) bool
    sample_ids: Tensor  # (B,)
    labels: Tensor | None = None  # (B,) int64 class ids, -1 for a sample without one; None when no sample has one


def collate(samples: list[Sample]) -> Batch:
    labels = None
    if any(s.label is not None for s in samples):
        labels = torch.tensor([-1 if s.label is None else s.label for s in samples], dtype=torch.long)
    return Batch(torch.stack([s.input_ids for s in samples]), torch.stack([s.targets for s in samples]),
                 torch.stack([s.loss_mask for s in samples]), torch.stack([s.doc_start for s in samples]),
                 torch.tensor([s.sample_id for s in samples], dtype=torch.long), labels)
