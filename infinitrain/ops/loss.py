"""The output layer and its token cross-entropy fused: loss and gradients in one pass, never all the logits at once.

``linear_cross_entropy(x, weight, targets, mask)`` equals cross-entropy(x Wᵀ) summed over the masked-in targets (the
naive twin: ``tests/naive_loss.py``'s ``token_loss_sum`` on ``F.linear(x, weight)``). It walks ``chunk`` rows at a
time: logits (c, V) in x's dtype, log-softmax in fp32, and, when a gradient is wanted, the gradient of the loss
sum for x and W right there (softmax − one-hot), so backward only scales them by the upstream gradient. The
logits of a chunk live only inside the chunk, and the output layer runs three matmuls per token (forward, dx,
dW), not four as when a checkpoint recomputes it in backward.
Shape legend: B batch, T tokens, D model dim, V vocabulary, c rows of a chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100  # F.cross_entropy's: such a target adds no loss and no gradient


def _chunk_ce(x: Tensor, weight: Tensor, targets: Tensor, mask: Tensor, want_grad: bool,
              ) -> tuple[Tensor, Tensor | None]:
    """x (c, D), targets/mask (c,) -> fp32 cross-entropy (c,) (0 where masked out) and, with want_grad, the gradient
    of its sum w.r.t. the logits (c, V) in x's dtype."""
    logp = F.log_softmax((x @ weight.t()).float(), -1)  # (c, V) fp32
    ce = F.nll_loss(logp, targets, reduction="none", ignore_index=IGNORE_INDEX) * mask  # = F.cross_entropy's
    if not want_grad:
        return ce, None
    live = (mask & (targets != IGNORE_INDEX)).to(logp.dtype)
    d_logp = torch.zeros_like(logp).scatter_(1, targets.clamp(min=0)[:, None], -live[:, None])  # nll's backward
    # autograd's own log-softmax backward (softmax · Σ − one-hot), so the gradient is bitwise the unfused one's
    return ce, torch.ops.aten._log_softmax_backward_data(d_logp, logp, 1, logp.dtype).to(x.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, targets: Tensor, mask: Tensor, chunk: int):
        B, T, D = x.shape
        xf, tf, mf = x.reshape(B * T, D), targets.reshape(B * T), mask.reshape(B * T)
        need_x, need_w = ctx.needs_input_grad[:2]
        gx = torch.empty_like(xf) if need_x else None
        wide = torch.promote_types(weight.dtype, torch.float32)
        gw = torch.zeros(weight.shape, dtype=wide, device=weight.device) if need_w else None
        ces = []
        for a in range(0, B * T, chunk):
            b = min(B * T, a + chunk)
            ce, g = _chunk_ce(xf[a:b], weight, tf[a:b], mf[a:b], need_x or need_w)
            ces.append(ce)
            if need_x:
                torch.mm(g, weight, out=gx[a:b])
            if need_w and gw.dtype == g.dtype:
                gw.addmm_(g.t(), xf[a:b])
            elif need_w:  # bf16 matmul, summed over chunks in fp32
                gw.add_(g.t() @ xf[a:b])
        ce = torch.cat(ces).view(B, T)
        ctx.save_for_backward(None if gx is None else gx.view(B, T, D), None if gw is None else gw.to(weight.dtype))
        ctx.mark_non_differentiable(ce)
        return ce.sum(), ce

    @staticmethod
    def backward(ctx, g_sum: Tensor, g_ce: Tensor | None):
        gx, gw = ctx.saved_tensors
        return (None if gx is None else gx * g_sum.to(gx.dtype), None if gw is None else gw * g_sum.to(gw.dtype),
                None, None, None)


def linear_cross_entropy(x: Tensor, weight: Tensor, targets: Tensor, mask: Tensor | None = None,
                         chunk: int = 512) -> tuple[Tensor, Tensor]:
    """x (B, T, D) final hidden states, weight (V, D) the output layer, targets (B, T) class ids (-100: ignored),
    mask (B, T) bool (None: all) -> (the summed fp32 cross-entropy of the masked-in targets (), differentiable; the
    per-token cross-entropy (B, T), 0 where masked out, detached). ``chunk``: rows (tokens) per step."""
    if mask is None:
        mask = torch.ones_like(targets, dtype=torch.bool)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(x, weight, targets, mask, chunk)
    B, T, D = x.shape
    xf, tf, mf = x.reshape(B * T, D), targets.reshape(B * T), mask.reshape(B * T)
    ce = torch.cat([_chunk_ce(xf[a:a + chunk], weight, tf[a:a + chunk], mf[a:a + chunk], False)[0]
                    for a in range(0, B * T, chunk)]).view(B, T)
    return ce.sum(), ce
