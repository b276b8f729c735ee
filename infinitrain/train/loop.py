"""``train(cfg, run_dir, resume)``: a TrainState plus a short loop of explicit calls.

    for each step: sampler -> micro-batches -> backward over TBPTT windows -> engine.step()
                   -> reduce stats -> skip or count -> log / eval / save -> stop on signal
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from infinitrain import faults
from infinitrain.errors import CollectiveError, ConfigError, DataError, Preempted, TrainingAborted
from infinitrain.train import checkpoint as ckpt
from infinitrain.train import tasks
from infinitrain.train.config import TrainConfig
from infinitrain.train.data import (DatasetMetrics, SampleSource, Validation, collate, make_sampler, next_micro_batches,
                                    open_source)
from infinitrain.train.engine import build_engine, deepspeed_config, init_distributed, setup_environment
from infinitrain.train.step import all_reduce, backward_windows, evaluate, reduce_stats
from infinitrain.train.world import RunLock


@dataclass
class TrainState:
    """What resumes the loop: saved with every checkpoint, together with the engine and the RNG."""

    step: int = 0  # optimizer steps applied
    tokens: int = 0  # tokens of applied steps (all ranks)
    data: dict[str, Any] = field(default_factory=dict)  # sampler state
    skipped_total: int = 0  # steps skipped for a non-finite loss or gradient
    skipped_in_row: int = 0


class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop agrees on it across ranks at the end of the step and saves."""

    def __init__(self) -> None:
        self.signum = 0
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def agreed(self) -> int:
        return int(all_reduce(torch.tensor([float(self.signum)], dtype=torch.float64)).max())

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


class Metrics:
    """Rank 0: metrics.jsonl rows, optional TensorBoard and the tqdm bar."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, start: int, enabled: bool):
        self.enabled = enabled
        self.file = open(run_dir / "metrics.jsonl", "a") if enabled else None
        self.tb = None
        if enabled and cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:
                pass
        self.bar = None
        if enabled and cfg.log.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.schedule.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, row["step"])

    def progress(self, n: int, **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


class RouterAccuracy:
    """Mixture-of-Depths router accuracy: how often sigmoid(r) > 0.5 agrees with the top-C choice per segment
    (the BCE target), counted by forward hooks on each routed block's router over a step (a recomputed
    forward counts twice, which leaves the ratio unchanged)."""

    def __init__(self, model) -> None:
        from infinitrain.model.layers import MoDBlock, topk_per_segment

        self.counts = None  # (2,) agreeing tokens, tokens: on the router's device until ``take`` (no sync per call)
        self.handles = []
        for block in model.layers:
            if isinstance(block, MoDBlock):
                S, C = block.segment_len, block.tokens_per_segment

                def hook(module, args, out, S=S, C=C) -> None:
                    logits = out.detach().squeeze(-1).float()  # (B, T)
                    if not module.training or logits.shape[1] % S:
                        return
                    chosen = torch.zeros_like(logits, dtype=torch.bool).scatter(1, topk_per_segment(logits, S, C), True)
                    if self.counts is None:
                        self.counts = torch.zeros(2, dtype=torch.float64, device=logits.device)
                    self.counts[0] += ((logits > 0) == chosen).sum()
                    self.counts[1] += logits.numel()

                self.handles.append(block.router.register_forward_hook(hook))

    def take(self) -> float | None:
        """Accuracy over all ranks since the last call (collective); None without routed blocks."""
        if not self.handles:
            return None
        c = all_reduce(torch.zeros(2, dtype=torch.float64) if self.counts is None else self.counts.cpu())
        self.counts = None
        return float(c[0] / c[1]) if c[1] else None


def gate_values(model, params=None, fn=torch.sigmoid) -> list[list[float]]:
    """sigmoid(β) per layer and head (collective under ZeRO-3: every rank calls it); with params and fn, fn of
    those (the memory temperatures: ``gate_values(model, model.tau_parameters(), torch.exp)``)."""
    from deepspeed.utils import safe_get_full_fp32_param

    params = model.gate_parameters() if params is None else params
    full = [safe_get_full_fp32_param(p) for p in params]  # None below stage 3 ...
    return [fn((f if f is not None else p).detach().float()).tolist()  # ... then p is whole
            for f, p in zip(full, params)]


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _configure_determinism(cfg: TrainConfig, rank: int):
    """Returns a function that restores the previous global settings (train() may run inside a test process)."""
    cudnn = torch.backends.cudnn
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.utils.deterministic.fill_uninitialized_memory, cudnn.deterministic, cudnn.benchmark)

    def restore() -> None:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.utils.deterministic.fill_uninitialized_memory = before[2]
        cudnn.deterministic, cudnn.benchmark = before[3:]

    if cfg.run.deterministic:
        # warn_only: on CUDA torch has no deterministic kernel for ops this model uses (a float cumsum in the
        # memory's prefix sums, cross_entropy's NLL); strict mode would stop every CUDA run, so torch names them
        # in a warning and CUDA resumes are close, not bitwise (CPU resumes are bitwise; cuBLAS is made
        # deterministic by CUBLAS_WORKSPACE_CONFIG, set in setup_environment)
        torch.use_deterministic_algorithms(True, warn_only=True)
        # no NaN-filling of torch.empty: it would make DeepSpeed's untouched bucket buffers resident (+2 GB)
        torch.utils.deterministic.fill_uninitialized_memory = False
        cudnn.deterministic, cudnn.benchmark = True, False
    torch.manual_seed(cfg.run.seed + 1000 * (rank + 1))  # per-rank stream (dropout); model init reseeds
    return restore


def _float_or_none(x) -> float | None:
    """DeepSpeed's global grad norm (None where it keeps none: ZeRO stage 0 in fp32)."""
    return None if x is None else float(x)


def optimizer_step(engine, bad_loss: bool, plain_fp32: bool) -> bool:
    """engine.step(); True if the step was skipped on every rank. ZeRO and bf16 optimizers skip a non-finite
    gradient norm themselves (``was_step_applied``); plain fp32 stage 0 has no such check, so there a
    non-finite loss drops the gradients without stepping the engine (nor its scheduler)."""
    if bad_loss and plain_fp32:
        engine.zero_grad()
        return True
    engine.step()
    return bad_loss or not engine.was_step_applied()


def _collective_failure(err: Exception) -> bool:
    """A peer died or a collective timed out (gloo raises a plain RuntimeError naming itself)."""
    text = str(err)
    return isinstance(err, dist.DistError) or any(
        k in text for k in ("Connection closed by peer", "Connection reset by peer", "gloo", "NCCL", "Timed out"))


def train(cfg: TrainConfig, run_dir: str | Path, resume: str = "auto",
          sources: tuple[SampleSource, SampleSource | None] | None = None, local_rank: int | None = None,
          allow_fallback: bool = False) -> dict[str, Any]:
    """Train to ``cfg.schedule.steps``; returns a summary. ``sources`` (train, val) replace ``data.path``.
    ``allow_fallback``: a damaged newest checkpoint is skipped for the previous one (logged) instead of an error."""
    setup_environment(local_rank, deterministic=cfg.run.deterministic)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    rank, world = init_distributed(cfg.run.timeout_s)
    restore_determinism = _configure_determinism(cfg, rank)
    try:
        return _train(cfg, Path(run_dir), resume, sources, rank, world, allow_fallback)
    except RuntimeError as err:
        if world > 1 and _collective_failure(err):
            done = ckpt.committed(Path(run_dir) / "checkpoints")
            raise CollectiveError(f"rank {rank}: a collective failed, a peer died or hung ("
                                  f"{str(err).strip().splitlines()[0][:200]}); last committed checkpoint: "
                                  f"{done[-1] if done else 'none'}; restart with --resume auto") from None
        raise
    finally:
        restore_determinism()


def _train(cfg: TrainConfig, run_dir: Path, resume: str, sources, rank: int, world: int,
           allow_fallback: bool) -> dict[str, Any]:
    cfg = tasks.resolve(cfg, sources)  # task classification: the class names from the data (config.yaml keeps them)
    ds_config = deepspeed_config(cfg, world)
    lock = _lock_run_dir(run_dir, rank)
    try:
        return _train_locked(cfg, run_dir, resume, sources, rank, world, allow_fallback, ds_config)
    finally:
        lock.release()


def _lock_run_dir(run_dir: Path, rank: int) -> RunLock:
    """Rank 0 takes ``run_dir/train.lock`` (collective: a refusal is raised on every rank)."""
    lock, error = RunLock(run_dir), None
    if rank == 0:
        try:
            note = lock.acquire()
            if note:
                print(f"warning: {note}", file=sys.stderr)
        except ConfigError as err:
            error = str(err)
    first = ckpt.agree(error)
    if first:
        raise ConfigError(first)
    return lock


def _prepare_run_dir(cfg: TrainConfig, run_dir: Path, rank: int, ds_config: dict[str, Any], resume: str
                     ) -> ckpt.Disks:
    """Rank 0 writes the resolved config; the ranks find which of them share the checkpoint disk (refusing
    node-local disks below ZeRO-3); each disk's leader removes partial saves (collective)."""
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=1))
    disks = ckpt.probe_disks(run_dir / "checkpoints", cfg.run.zero_stage)
    if disks.leader:
        ckpt.clean_partial(run_dir / "checkpoints")
    error = None
    if rank == 0 and resume == "none" and ckpt.committed(run_dir / "checkpoints"):
        error = f"{run_dir / 'checkpoints'} already holds checkpoints; use --resume auto or a new --run-dir"
    first = ckpt.agree(error)
    if first:
        raise ConfigError(first)
    if rank == 0 and not disks.shared:
        print(f"checkpoints on node-local disks: {disks.describe()} (each disk holds its ranks' files and the "
              "manifest; resume with the same ranks on the same nodes)", file=sys.stderr)
    return disks


def _train_locked(cfg: TrainConfig, run_dir: Path, resume: str, sources, rank: int, world: int,
                  allow_fallback: bool, ds_config: dict[str, Any]) -> dict[str, Any]:
    disks = _prepare_run_dir(cfg, run_dir, rank, ds_config, resume)
    if sources is None:
        if cfg.data.path is None:
            raise ConfigError("no training data: pass --data DIR or set data.path in the recipe")
        sources = open_source(cfg.data.path, cfg.sample_len, cfg.model.vocab_size, cfg.data.val_fraction,
                              cfg.data.pack)
    train_src, val_src = tasks.task_sources(cfg, sources)
    if train_src.sample_len != cfg.sample_len:
        raise DataError(f"data samples have {train_src.sample_len} tokens, the recipe needs "
                        f"{cfg.data.segments_per_sample} x {cfg.model.segment_len} = {cfg.sample_len}")
    if train_src.vocab_size > cfg.model.vocab_size:
        raise DataError(f"data vocabulary ({train_src.vocab_size}) exceeds model.vocab_size ({cfg.model.vocab_size})")

    resume_from, fallbacks = ckpt.choose(run_dir, resume, allow_fallback)  # checked before the engine is built
    engine, model = build_engine(cfg, ds_config)
    sampler = make_sampler(train_src, micro_batch=cfg.data.micro_batch_size, grad_accum=cfg.data.grad_accum,
                           rank=rank, world=world, seed=cfg.data.seed)
    state = TrainState()
    if resume_from is not None:
        state = TrainState(**ckpt.load(engine, resume_from)["train_state"])
        sampler.load_state_dict(state.data)
    val = Validation(val_src, cfg.data.val_samples, cfg.data.micro_batch_size, rank, world)
    if not val and rank == 0:
        print("note: the data has no validation split: no val_loss (data.val_fraction, or prepare --val-fraction)",
              file=sys.stderr)
    per_dataset = DatasetMetrics(train_src, sampler)  # mixtures: tokens and loss per dataset

    S, W = cfg.model.segment_len, cfg.window
    tokens_per_step = sampler.global_batch_size * cfg.sample_len
    stop = _StopFlag()
    router = RouterAccuracy(model)
    metrics = Metrics(run_dir, cfg, state.step, enabled=rank == 0)
    if resume_from is not None and rank == 0:
        for skipped_error in fallbacks:
            print(f"warning: skipped a damaged checkpoint (--allow-fallback): {skipped_error}", file=sys.stderr)
        print(f"resuming from {resume_from} (step {state.step})", file=sys.stderr)
        metrics.write({"step": state.step, "resumed_from": str(resume_from), "fallbacks": fallbacks})
    last_saved, last_val, loss, window_start, window_tokens = state.step, math.nan, math.nan, time.time(), 0

    def save() -> Path:
        state.data = sampler.state_dict()
        return ckpt.save(engine, run_dir / "checkpoints", state.step, {"train_state": dataclasses.asdict(state)},
                         cfg.checkpoint.keep_last, disks)

    try:
        while state.step < cfg.schedule.steps:
            attempt = state.step + state.skipped_total + 1  # step attempts, skipped ones included (fault hooks)
            faults.point("step_start", attempt)
            indices = next_micro_batches(sampler, cfg.data.micro_batch_size)
            micro = [collate([train_src[i] for i in idx]) for idx in indices]
            stats = backward_windows(engine, micro, segment_len=S, window=W, aux_weight=cfg.tbptt.mod_aux_weight,
                                     step=attempt)
            stats = reduce_stats(stats)
            bad_loss = bool(stats.nonfinite > 0)
            skipped = optimizer_step(engine, bad_loss, cfg.run.zero_stage == 0 and cfg.run.precision == "fp32")
            faults.point("after_step", attempt)
            faults.trace({"attempt": attempt, "step": state.step + (not skipped), "skipped": skipped,
                          "ids": [int(i) for mb in micro for i in mb.sample_ids]},
                         module=engine.module if faults.tracing() else None)
            if skipped:
                state.skipped_total += 1
                state.skipped_in_row += 1
                metrics.write({"step": state.step + 1, "skipped": True, "skipped_total": state.skipped_total,
                               "skipped_in_row": state.skipped_in_row,
                               "reason": "non-finite loss" if bad_loss else "non-finite gradient"})
                if state.skipped_in_row >= cfg.run.max_nonfinite:
                    raise TrainingAborted(f"{state.skipped_in_row} steps in a row had a non-finite loss or gradient "
                                          f"(run.max_nonfinite={cfg.run.max_nonfinite}); stopped at step {state.step}")
            else:
                state.skipped_in_row = 0
                state.step += 1
                state.tokens += tokens_per_step
                window_tokens += tokens_per_step
                loss = float(stats.loss_sum / stats.targets)
                per_dataset.add(indices, micro, stats.sample_loss)
                metrics.progress(1, loss=f"{loss:.4f}",
                                 tok_s=f"{window_tokens / max(1e-9, time.time() - window_start):.0f}")

            step = state.step
            if not skipped and (step % cfg.log.every == 0 or step == cfg.schedule.steps):
                gates = gate_values(model)
                elapsed = max(1e-9, time.time() - window_start)
                metrics.write({
                    "step": step, "tokens": state.tokens, "loss": loss,
                    "loss_per_segment": (stats.seg_loss / stats.seg_targets.clamp(min=1)).tolist(),
                    "lr": engine.lr_scheduler.get_last_lr()[0], "gate_lr": engine.lr_scheduler.get_last_lr()[-1],
                    "grad_norm": _float_or_none(engine.get_global_grad_norm()), "tokens_per_s": window_tokens / elapsed,
                    "peak_mem_mb": peak_memory_mb(), "mod_aux_loss": float(stats.aux),
                    "mod_router_acc": router.take(), "gates": gates,
                    **({"memory_tau": gate_values(model, model.tau_parameters(), torch.exp)}
                       if model.tau_parameters() else {}),
                    "skipped_total": state.skipped_total, **per_dataset.row()})
                window_start, window_tokens = time.time(), 0
            if not skipped and cfg.log.eval_every and step % cfg.log.eval_every == 0 and val:
                last_val, per_val = val.run(lambda batches: evaluate(engine, batches, segment_len=S, window=W))
                metrics.write({"step": step, "val_loss": last_val, **per_val})
            if not skipped and cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0:
                save()
                last_saved = step
            faults.signal_after(state.step)
            signum = stop.agreed()
            if signum:
                done = ckpt.committed(run_dir / "checkpoints")
                path = done[-1] if last_saved == state.step and done else save()
                raise Preempted(signum, path)

        if val and not (cfg.log.eval_every and state.step % cfg.log.eval_every == 0):
            last_val, per_val = val.run(lambda batches: evaluate(engine, batches, segment_len=S, window=W))
            metrics.write({"step": state.step, "val_loss": last_val, **per_val})
        done = ckpt.committed(run_dir / "checkpoints")
        path = done[-1] if last_saved == state.step and done else save()
        return {"step": state.step, "tokens": state.tokens, "loss": loss, "val_loss": last_val if val else None,
                "skipped_total": state.skipped_total, "checkpoint": str(path) if path else None}
    finally:
        metrics.close()
        stop.restore()
