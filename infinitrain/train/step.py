"""One optimizer step of truncated BPTT, and validation: the loss function and the window loop.

A sample of N segments runs in windows of W segments; each window is one layer-major model call (every
layer processes all W segments at once, so ZeRO-3 gathers each layer once per window) and one backward;
the memory state is carried to the next window and detached there. The loss of every window is its
summed token cross-entropy divided by the number of target tokens in the whole global batch (all
micro-batches, windows and ranks), so the step is the same for any W.
Shape legend: B micro-batch, L = N·S sample tokens, W segments per window, S segment length, V vocabulary.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from infinitrain import faults
from infinitrain.ops.memory import documents_inside
from infinitrain.train.batch import Batch


class StepStats(NamedTuple):
    """This rank's sums for one step; ``reduce`` adds them over ranks."""

    loss_sum: Tensor  # () summed token cross-entropy
    targets: Tensor  # () target tokens
    seg_loss: Tensor  # (N,) summed cross-entropy per segment index
    seg_targets: Tensor  # (N,)
    aux: Tensor  # () token-weighted MoD router BCE
    nonfinite: Tensor  # () 1 if this rank saw a non-finite loss
    sample_loss: Tensor | None = None  # (samples,) this rank's summed cross-entropy per sample, micro-batch order


def all_reduce(t: Tensor) -> Tensor:
    """Sum over ranks of a small CPU tensor (through the accelerator when the backend is nccl)."""
    if dist.get_backend() == "nccl":
        t_dev = t.cuda()
        dist.all_reduce(t_dev)
        return t_dev.cpu()
    dist.all_reduce(t)
    return t


def global_target_count(micro_batches: list[Batch]) -> Tensor:
    return all_reduce(sum(mb.loss_mask.sum() for mb in micro_batches).to(torch.float64))


def spans(length: int, span: int) -> list[tuple[int, int]]:
    """The TBPTT windows [a, b) of a sample of ``length`` tokens, ``span`` tokens each (the last may be shorter)."""
    return [(a, min(length, a + span)) for a in range(0, length, span)]


def forward_window(engine, mb: Batch, a: int, b: int, state, segment_len: int):
    """One window's model call with its targets, training and validation alike: the summed loss and the state."""
    dev, doc_start = engine.device, mb.doc_start[:, a:b]
    return engine(mb.input_ids[:, a:b].to(dev), state, doc_start=doc_start.to(dev),
                  targets=mb.targets[:, a:b].to(dev), loss_mask=mb.loss_mask[:, a:b].to(dev),
                  doc_inside=documents_inside(doc_start, segment_len))  # from the host copy: no sync


def backward_windows(engine, micro_batches: list[Batch], *, segment_len: int, window: int, aux_weight: float,
                     step: int = -1) -> StepStats:
    """Forward and backward every window of every micro-batch of this rank; leaves the reduced gradient of
    the global batch in the engine (DeepSpeed averages over ranks, hence the world-size factor)."""
    world = dist.get_world_size()
    n_targets = global_target_count(micro_batches)
    scale = world / max(1.0, float(n_targets))  # × world because DeepSpeed averages gradients over ranks
    tokens_per_rank = sum(mb.input_ids.numel() for mb in micro_batches)
    B, L = micro_batches[0].input_ids.shape
    N, windows = L // segment_len, spans(L, window * segment_len)
    dev = engine.device
    # sums stay on the device until the step ends: a .cpu() per window would stall the host on every backward
    sums = dict(loss=(), aux=(), seg=(N,), nonfinite=(), sample=(len(micro_batches) * B,))
    stats = {k: torch.zeros(shape, dtype=torch.float64, device=dev) for k, shape in sums.items()}
    n_backward, total = 0, len(micro_batches) * len(windows)
    for m, mb in enumerate(micro_batches):
        state = None  # memory resets at every sample start
        for a, b in windows:
            n_backward += 1
            engine.set_gradient_accumulation_boundary(n_backward == total)
            out = forward_window(engine, mb, a, b, state, segment_len)
            loss_sum, ce = out.loss_sum, out.token_loss  # chunked: the window's logits are never all kept
            # the router loss is a per-token mean: weight windows by tokens (× world / world for the DS average)
            aux_share = (b - a) * B / tokens_per_rank
            loss = loss_sum * scale + (aux_weight * aux_share) * out.aux_loss
            if faults.matches("nan", step):
                loss = loss * float("nan")
            engine.backward(loss, scale_wrt_gas=False)
            faults.point("mid_step", step)
            state = out.state.detach()
            stats["nonfinite"] = torch.maximum(stats["nonfinite"], (~torch.isfinite(loss.detach())).double())
            stats["loss"] += loss_sum.detach().double()
            stats["aux"] += out.aux_loss.detach().double() * aux_share
            stats["seg"][a // segment_len:math.ceil(b / segment_len)] += (
                ce.double().view(B, -1, segment_len).sum(dim=(0, 2)))
            stats["sample"][m * B:(m + 1) * B] += ce.double().sum(1)
    stats = {k: v.cpu() for k, v in stats.items()}
    seg_targets = torch.stack([mb.loss_mask.view(B, N, segment_len).sum(dim=(0, 2)) for mb in micro_batches]).sum(0)
    return StepStats(stats["loss"], n_targets, stats["seg"], seg_targets.double(), stats["aux"], stats["nonfinite"],
                     stats["sample"])


def reduce_stats(s: StepStats) -> StepStats:
    """Sum every field over ranks in one collective (targets is already global)."""
    flat = all_reduce(torch.cat([s.loss_sum.view(1), s.seg_loss, s.seg_targets, s.aux.view(1), s.nonfinite.view(1)]))
    N = s.seg_loss.numel()
    return StepStats(flat[0], s.targets, flat[1:1 + N], flat[1 + N:1 + 2 * N], flat[1 + 2 * N] / dist.get_world_size(),
                     flat[2 + 2 * N], s.sample_loss)  # per-sample losses stay this rank's


@torch.no_grad()
def evaluate(engine, batches: list[Batch], *, segment_len: int, window: int) -> float:
    """Mean validation cross-entropy per target token over all ranks (eval mode; memory carried, no grad)."""
    was_training = engine.module.training
    engine.module.eval()
    tot = torch.zeros(2, dtype=torch.float64)
    for mb in batches:
        state = None
        for a, b in spans(mb.input_ids.shape[1], window * segment_len):
            out = forward_window(engine, mb, a, b, state, segment_len)
            tot[0] += out.loss_sum.double().cpu()
            tot[1] += mb.loss_mask[:, a:b].sum()
            state = out.state
    tot = all_reduce(tot)
    engine.module.train(was_training)
    return float(tot[0] / tot[1]) if tot[1] > 0 else math.nan
