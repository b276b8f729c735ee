"""The naive twin of the model's chunked loss, the tests' reference for it: full logits, then cross-entropy.

Shape legend: B batch, T tokens, V vocabulary."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def token_loss_sum(logits: Tensor, targets: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy over the masked-in targets (fp32), and the per-token loss (B, T) detached: the
    naive twin of the model's chunked loss (``InfiniLM.forward(..., targets=)``), which the trainer uses."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    ce = ce * mask  # (B, T); masked targets contribute exactly 0
    return ce.sum(), ce.detach()
