"""Gradient parity: the DeepSpeed ZeRO-3 engine's TBPTT gradients equal a plain-PyTorch TBPTT reference.

One global batch (micro-batches × windows × ranks) with document starts inside samples and a
Mixture-of-Depths layer; W = 1, 2 and N; activation checkpointing none, layer and segment. The MEGALODON family
(model.arch megalodon) on the same batches, fewer cases. 1 rank runs
in-process; 2 ranks run this file under ``torchrun --nproc_per_node 2`` (it prints one JSON line per case).
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from infinitrain.train.config import TrainConfig
from infinitrain.train.data import Batch

from naive_loss import token_loss_sum

N, S, B, ACCUM = 4, 8, 2, 2
AUX = 0.5
CASES = [("infini", 1, "none"), ("infini", 2, "none"), ("infini", N, "none"), ("infini", 1, "segment"),
         ("infini", 2, "layer"), ("infini", N, "segment"), ("infini", N, "layer"),
         ("megalodon", 1, "none"), ("megalodon", 2, "layer"), ("megalodon", N, "segment")]
MODELS = {
    "infini": {"vocab_size": 61, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 48,
               "segment_len": S, "mod_every": 2, "mod_capacity": 0.5, "gate_init": 0.3},
    "megalodon": {"arch": "megalodon", "vocab_size": 61, "d_model": 32, "n_layers": 2, "n_heads": 2, "head_dim": 8,
                  "v_dim": 24, "d_ff": 48, "ema_dim": 4, "norm_groups": 4, "segment_len": S},
}


def config(window: int, ckpt: str, arch: str = "infini") -> TrainConfig:
    return TrainConfig.from_dict({
        "model": MODELS[arch],
        "data": {"segments_per_sample": N, "micro_batch_size": B, "grad_accum": ACCUM},
        "optim": {"grad_clip": 0.0}, "tbptt": {"window": window, "checkpointing": ckpt, "mod_aux_weight": AUX},
        "run": {"precision": "fp32", "zero_stage": 3, "seed": 7},
        # partition every parameter (tiny ones stay whole on every rank by default, testing nothing)
        "deepspeed": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}})


def global_batch(world: int) -> list[Batch]:
    """ACCUM micro-batches per rank, for every rank (rank r's are [r*ACCUM, (r+1)*ACCUM))."""
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(world * ACCUM):
        ids = torch.randint(0, 61, (B, N * S + 1), generator=g)
        mask = torch.rand(B, N * S, generator=g) > 0.2
        doc = torch.zeros(B, N * S, dtype=torch.bool)
        doc[:, 0] = True
        doc[0, 13] = doc[1, 2 * S] = True  # documents start inside a segment and on a boundary
        out.append(Batch(ids[:, :-1], ids[:, 1:], mask, doc, torch.arange(B)))
    return out


def reference_grads(model, batches: list[Batch], window: int) -> dict[str, torch.Tensor]:
    """Plain PyTorch TBPTT over the whole global batch: loss per window / all target tokens."""
    model.train()
    n_targets = sum(int(b.loss_mask.sum()) for b in batches)
    total_tokens = sum(b.input_ids.numel() for b in batches)
    for mb in batches:
        state = None
        for a in range(0, N * S, window * S):
            e = a + window * S
            out = model(mb.input_ids[:, a:e], state, doc_start=mb.doc_start[:, a:e])
            ce, _ = token_loss_sum(out.logits, mb.targets[:, a:e], mb.loss_mask[:, a:e])
            loss = ce / n_targets + AUX * out.aux_loss * (e - a) * B / total_tokens
            loss.backward()
            state = out.state.detach()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def engine_grads(window: int, ckpt: str, arch: str = "infini") -> tuple[float, float]:
    """(max abs diff, max abs grad) of engine vs reference gradients, on this rank."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    from infinitrain.train.engine import build_engine, build_model, deepspeed_config
    from infinitrain.train.step import backward_windows

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = config(window, ckpt, arch)
    ds = deepspeed_config(cfg, world)
    model = build_model(cfg, ds)
    ref = copy.deepcopy(model)
    batches = global_batch(world)
    engine, _ = build_engine(cfg, ds, model)
    if world > 1:
        assert all(p.ds_tensor.numel() < p.ds_numel for p in engine.module.parameters() if p.ds_numel > 1)
    backward_windows(engine, batches[rank * ACCUM:(rank + 1) * ACCUM], segment_len=S, window=window, aux_weight=AUX)
    got = {n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.named_parameters()}
    want = reference_grads(ref, batches, window)
    engine.step()  # close the accumulation boundary cleanly
    diff = max(float((got[n] - want[n]).abs().max()) for n in want)
    scale = max(float(g.abs().max()) for g in want.values())
    return diff, scale


def _setup():
    from infinitrain.train.engine import init_distributed, setup_environment

    setup_environment()
    return init_distributed()


@pytest.mark.parametrize("arch,window,ckpt", CASES)
def test_parity_one_rank(arch, window, ckpt):
    _setup()
    diff, scale = engine_grads(window, ckpt, arch)
    print(f"{arch} W={window} ckpt={ckpt}: max |grad diff| {diff:.2e} (max |grad| {scale:.2e})")
    assert scale > 1e-4 and diff <= 1e-5


@pytest.mark.slow
def test_parity_two_ranks():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(_port()), __file__], env=env, capture_output=True, text=True,
                         timeout=600, cwd=Path(__file__).resolve().parent.parent)
    rows = [json.loads(m) for m in re.findall(r"PARITY (\{.*?\})", res.stdout)]  # rank lines may interleave
    assert res.returncode == 0 and len(rows) == 2 * len(CASES), res.stdout[-3000:] + res.stderr[-3000:]
    for r in rows:
        print(r)
        assert r["scale"] > 1e-4 and r["diff"] <= 1e-5, r


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":  # a torchrun rank
    rank, world = _setup()
    torch.set_num_threads(1)
    for arch, window, ckpt in CASES:
        diff, scale = engine_grads(window, ckpt, arch)
        print("PARITY " + json.dumps({"rank": rank, "world": world, "arch": arch, "window": window, "ckpt": ckpt,
                                      "diff": diff, "scale": scale}), flush=True)
