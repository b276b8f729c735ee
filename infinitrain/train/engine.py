"""The DeepSpeed side: process group set-up, the DeepSpeed config (built in ONE function), the engine, and
activation checkpointing applied to the model's layers from outside (the model has no distributed code).
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from infinitrain.model import InfiniLM, count_parameters
from infinitrain.train.config import STAGE_REF, TrainConfig, deep_merge
from infinitrain.train.world import World

ZERO_INIT_MIN_PARAMS = 500_000_000  # run.zero_init=auto: build partitioned from the start above this size


# --- process group ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_environment(local_rank: int | None = None, deterministic: bool = False) -> World:
    """Make every launcher look like torchrun: RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from the launcher's own
    variables (``infinitrain.train.world``; refused in one line when a launcher's world is incomplete),
    DS_ACCELERATOR=cpu when there is no CUDA. On CUDA: deterministic cuBLAS when ``deterministic``
    (CUBLAS_WORKSPACE_CONFIG, read when cuBLAS starts), and NCCL's watchdog stated: a collective waiting longer
    than the process group's timeout (run.timeout_s) aborts the process (SIGABRT), torch's default, made
    explicit so that what the README documents does not move with torch. Call before ``import deepspeed``."""
    from infinitrain.train.world import detect_world, mpi_rank0_address

    world = detect_world(os.environ, local_rank, discover=mpi_rank0_address)
    os.environ.update(world.env())
    if world.launcher == "none" and world.master_port == 0:  # a world of one: any free port
        os.environ["MASTER_PORT"] = str(_free_port())
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        return world
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")  # tear the process down, skip comm clean-up
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return world


STALE_BUILD_LOCK_S = 300.0  # no build of DeepSpeed's shm op (~35 s on 2 cores) holds its lock this long
BUILD_START_GRACE_S = 10.0  # from taking the lock to starting ninja in the build directory


def build_directory(name: str) -> Path:
    """Where torch JIT-builds the extension ``name`` (TORCH_EXTENSIONS_DIR, else its default per Python and
    accelerator): torch's own rule, the one DeepSpeed's op builders go through (it creates the directory)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False))


def _building_in(build_dir: Path) -> bool | None:
    """Whether some process works in ``build_dir`` (torch runs ninja there); None when there is no /proc.
    Processes we may not look at (init, other users') are not counted: a build in our own extensions directory
    is our own process."""
    if not os.path.isdir("/proc"):
        return None
    target = os.path.realpath(build_dir)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:  # gone, a zombie, or not ours to look at
            continue
        if cwd == target or cwd.startswith(target + os.sep):
            return True
    return False


def wait_for_op_build(name: str, stale_s: float = STALE_BUILD_LOCK_S, poll_s: float = 1.0) -> Path | None:
    """Wait while another process JIT-builds the torch extension ``name``; remove its lock when no build is
    running (no process in the build directory ``BUILD_START_GRACE_S`` after the lock was taken) or the lock is
    older than ``stale_s``, and return it. None: there was no lock, or its build finished.

    torch's build lock is a bare file (``<extensions dir>/<name>/lock``) with no owner: a build killed mid-way
    (SIGKILL, a job's time limit, a session's end) leaves it, and every later process waits on it forever inside
    ``deepspeed.init_distributed`` (a CI run hung 90 minutes there). Call before DeepSpeed builds the op."""
    lock, announced = build_directory(name) / "lock", False
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return None
        orphan = age > BUILD_START_GRACE_S and _building_in(lock.parent) is False
        if orphan or age > stale_s:
            lock.unlink(missing_ok=True)
            why = "no build is running" if orphan else f"older than {stale_s:.0f} s"
            print(f"warning: {lock}: removed a build lock {age:.0f} s old ({why}: a killed build left it)",
                  file=sys.stderr)
            return lock
        if not announced:
            print(f"waiting for another process's build of {name} ({lock})", file=sys.stderr)
            announced = True
        time.sleep(poll_s)


def init_distributed(timeout_s: float | None = None) -> tuple[int, int]:
    """(rank, world size) after the process group is up (gloo on CPU, nccl on CUDA); ``timeout_s`` bounds every
    collective (run.timeout_s; DeepSpeed's default is 30 min)."""
    import datetime

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    shm = get_accelerator().create_op_builder("ShareMemCommBuilder")  # built (JIT) by init_distributed on CPU
    if shm is not None:
        wait_for_op_build(shm.NAME)
    timeout = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
    with contextlib.redirect_stdout(io.StringIO()):  # "DeepSpeed ...shm_comm_op built successfully": not ours
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False,
                                   **timeout)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --- the DeepSpeed config ------------------------------------------------------------------------------


def deepspeed_config(cfg: TrainConfig, world_size: int, cuda: bool | None = None) -> dict[str, Any]:
    """The whole DeepSpeed JSON, from the run config; the recipe's ``deepspeed:`` block is merged last.

    DeepSpeed counts one "micro-batch" per backward, and we run one backward per TBPTT window, so its
    gradient_accumulation_steps is grad_accum × windows (the trainer marks the boundary itself). Under bf16 at
    ZeRO-2/3 those backwards accumulate into fp32 gradient partitions (``data_types.grad_accum_dtype``: without
    it DeepSpeed sums grad_accum × windows bf16 gradients in bf16); gradients are reduced in fp32
    (``communication_data_type``, torchtitan's default reduce dtype). ZeRO-3 overlaps its communication with
    compute on CUDA (``cuda``: default whether CUDA is present); on the CPU it stays off, as tested.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    gas = cfg.data.grad_accum * cfg.n_windows
    micro = cfg.data.micro_batch_size
    zero: dict[str, Any] = {"stage": cfg.run.zero_stage}
    if cfg.run.zero_stage == 3:
        # stage3_max_reuse_distance 0: on the first step with a recorded trace, ZeRO-3 decides for each module call
        # which parameters to release by scanning the trace forward until this many elements (default 1e9); our
        # blocks are called once per segment, so below 1e9 parameters the scan runs to the trace's end: O(calls^2)
        # once (debug recipe, 16 segments: step 2 took 12 s of CPU against 0.4 s; SmolLM2-135M, 8 segments: see
        # benchmarks/finetune_speed.py). 0 releases a block's parameters after each call, as ZeRO-3 does anyway for
        # reuse a whole model apart (>= 1e9 parameters); a small model on many GPUs re-gathers them per segment.
        zero.update(overlap_comm=cuda, contiguous_gradients=True, stage3_gather_16bit_weights_on_model_save=False,
                    stage3_max_reuse_distance=0)
    ds = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "train_batch_size": micro * gas * world_size,
        "gradient_clipping": cfg.optim.grad_clip,  # always stated: DeepSpeed's default became 1.0 in 0.19.3
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.run.precision == "bf16"},
        "fp16": {"enabled": False},
        "communication_data_type": "fp32",
        "zero_allow_untested_optimizer": True,  # our optimizer is torch AdamW (no JIT-built FusedAdam)
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if cfg.run.precision == "fp32" or cfg.run.zero_stage >= 2:
        # stage 0 cannot mix bf16 weights with fp32 accumulation, stage 1 would switch to another optimizer
        # (DeepSpeed's BF16_Optimizer): there bf16 gradients accumulate in bf16
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    return deep_merge(ds, cfg.deepspeed)


# --- model, optimizer, schedule ---------------------------------------------------------------------------


def lr_lambda(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the base lr for optimizer step ``step`` (0-based): linear warmup, then cosine."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: InfiniLM, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Up to four groups: matrices (weight decay), norms/biases/embedding-free vectors (no decay), memory
    temperatures log τ (no decay, ``optim.tau_lr``: null = lr), gates β (no decay, ``optim.gate_lr``; last)."""
    gate_ids = {id(p) for p in model.gate_parameters()}
    tau_ids = {id(p) for p in model.tau_parameters()}
    decay, no_decay, taus, gates = [], [], [], []
    for p in model.parameters():
        if not p.requires_grad:  # frozen by the recipe's finetune section
            continue
        if id(p) in gate_ids:
            gates.append(p)
        elif id(p) in tau_ids:
            taus.append(p)
        elif getattr(p, "ds_shape", p.shape).__len__() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay, "lr": o.lr, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "lr": o.lr, "name": "no_decay"},
              {"params": taus, "weight_decay": 0.0, "lr": o.lr if o.tau_lr is None else o.tau_lr, "name": "memory_tau"},
              {"params": gates, "weight_decay": 0.0, "lr": o.gate_lr, "name": "gates"}]
    return [g for g in groups if g["params"]]


def _init_module(module: nn.Module, std: float, gate_init: list[float], memory_tau: float | None = None) -> None:
    """``InfiniLM.reset_parameters`` one module at a time, for models built under ``zero.Init`` (whose
    ``module.apply`` gathers each module's own parameters around the call)."""
    with torch.no_grad():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        if hasattr(module, "betas") and isinstance(module.betas, nn.Parameter):
            module.betas.copy_(torch.tensor(gate_init))
        if isinstance(getattr(module, "log_tau", None), nn.Parameter):
            module.log_tau.fill_(math.log(memory_tau))
        if hasattr(module, "reset_own_parameters"):
            module.reset_own_parameters()


def build_model(cfg: TrainConfig, ds_config: dict[str, Any]) -> InfiniLM:
    """The model, seeded by run.seed; partitioned at construction under zero.Init for big stage-3 runs; then
    ``run.init_from``'s weights if set (``infinitrain.train.init_from``)."""
    import deepspeed

    big = cfg.run.zero_init == "auto" and count_parameters(cfg.model) >= ZERO_INIT_MIN_PARAMS
    use_init = cfg.run.zero_stage == 3 and (cfg.run.zero_init is True or big)
    torch.manual_seed(cfg.run.seed)
    if not use_init:
        model = InfiniLM(cfg.model)
    else:
        # dtype comes from the config's bf16 flag (DeepSpeed 0.19.8 ignores an explicit dtype on a CPU without fp16)
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = InfiniLM(cfg.model)
            # reset_parameters ran on already-partitioned (empty) tensors; redo it module by module: inside the
            # context, Module.apply gathers each module's own parameters around the call and re-partitions them
            model.apply(functools.partial(_init_module, std=cfg.model.init_std,
                                          gate_init=cfg.model.gate_init_per_head(),
                                          memory_tau=cfg.model.memory_tau))
    if cfg.run.init_from is not None:
        load_init_weights(model, cfg)
    from infinitrain.train.finetune import apply_finetune

    summary = apply_finetune(model, cfg.finetune, seed=cfg.run.seed)  # LoRA adapters, frozen parameters
    if summary and os.environ.get("RANK", "0") == "0":
        print(summary, file=sys.stderr)
    return model


def load_init_weights(model: InfiniLM, cfg: TrainConfig):
    """``run.init_from``: the source's weights into the freshly built model (before ``deepspeed.initialize``)."""
    from infinitrain.errors import ConfigError
    from infinitrain.train import init_from

    if cfg.run.init_from.startswith(STAGE_REF):
        raise ConfigError(f"run.init_from {cfg.run.init_from!r}: a stage reference is resolved by `infinitrain train "
                          "--stage` (or pass a directory)")
    return init_from.load_into(model, cfg.model, cfg.run.init_from)


def adamw(groups: list[dict[str, Any]], **kw) -> torch.optim.AdamW:
    """torch AdamW, fused (one pass over each flat parameter, no temporaries) where this torch has the kernel for
    the parameters' device and dtype, else the single-tensor loop. On CPU the fused step of a 58 M-parameter
    flat partition took 0.4-0.6 s against 2.8-3.4 s for the loop (same run, loaded machine): the loop allocates
    fresh 233 MB temporaries (sqrt, div) every step, each page-faulted in again."""
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.AdamW(groups, foreach=False, **kw)


def build_engine(cfg: TrainConfig, ds_config: dict[str, Any], model: InfiniLM | None = None):
    """(engine, model): DeepSpeed engine over torch AdamW with the gate group and a warmup+cosine LambdaLR."""
    import deepspeed

    model = model if model is not None else build_model(cfg, ds_config)
    apply_activation_checkpointing(model, cfg.tbptt.checkpointing, cfg.model.segment_len)
    o, s = cfg.optim, cfg.schedule
    opt = adamw(param_groups(model, cfg), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    sched = functools.partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=functools.partial(
        lr_lambda, warmup=s.warmup, total=s.steps, min_ratio=s.min_lr_ratio))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_config)
    return engine, model


# --- activation checkpointing (non-reentrant), applied from outside -----------------------------------------


def _slice_time(kw: dict[str, Any], T: int, a: int, b: int) -> dict[str, Any]:
    """Per-token keyword tensors (B, T, ...) such as ``doc_start`` cut to tokens [a, b)."""
    return {k: v[:, a:b] if isinstance(v, Tensor) and v.dim() >= 2 and v.shape[1] == T else v for k, v in kw.items()}


def _layer_checkpointed(forward, x: Tensor, state=None, **kw):
    """Recompute the whole layer (all W segments of the window) in backward; keep only its input."""
    return checkpoint(forward, x, state, use_reentrant=False, **kw)


def _segment_checkpointed(forward, segment_len: int, x: Tensor, state=None, **kw):
    """The paper's scheme: one checkpoint per (layer, segment); keeps segment inputs and memory states only."""
    T = x.shape[1]
    ys, aux = [], x.new_zeros((), dtype=torch.float32)
    starts = range(0, T, segment_len)
    for a in starts:
        b = min(T, a + segment_len)
        y, state, a_loss = checkpoint(forward, x[:, a:b], state, use_reentrant=False, **_slice_time(kw, T, a, b))
        ys.append(y)
        aux = aux + a_loss
    return torch.cat(ys, dim=1), state, aux / len(starts)  # the aux loss is a per-token mean: average segments


def apply_activation_checkpointing(model: InfiniLM, mode: str, segment_len: int) -> None:
    """Wrap each block's forward ``(x, state) -> (x, state, aux)`` in torch's non-reentrant checkpoint
    (reentrant checkpointing crashes ZeRO-3 when blocks are reused across segments). Names and
    parameters are untouched, so checkpoints are the same with or without it."""
    if mode == "none":
        return
    for block in model.layers:
        inner = type(block).forward.__get__(block)
        if mode == "layer":
            block.forward = functools.partial(_layer_checkpointed, inner)
        elif mode == "segment":
            block.forward = functools.partial(_segment_checkpointed, inner, segment_len)
        else:
            raise ValueError(f"checkpointing must be none, layer or segment; got {mode!r}")
