"""``train(cfg, run_dir, resume)``: a TrainState plus a short loop of explicit calls.

    for each step: sampler -> micro-batches -> backward over TBPTT windows -> engine.step()
                   -> reduce stats -> skip or count -> log / eval / save -> stop on signal
"""

from __future__ import annotations

import dataclasses
import json
import math
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

from infinitrain import faults, hardware
from infinitrain.atomic import write_atomic
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


def plain_grad_norm(engine) -> float | None:
    """The global gradient norm before clipping, where DeepSpeed keeps none (ZeRO stage 0 in fp32): there every
    rank holds whole gradients, already averaged over the ranks at the step boundary. Call before engine.step()."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else None


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
    cfg = _resolve_precision(cfg, rank)
    ds_config = deepspeed_config(cfg, world)
    made = [p for p in (run_dir, *run_dir.parents) if not p.exists()]  # what a refused start must not leave
    lock = _lock_run_dir(run_dir, rank)
    try:
        return _train_locked(cfg, run_dir, resume, sources, rank, world, allow_fallback, ds_config)
    finally:
        lock.release()
        for p in made if rank == 0 else ():  # a start refused before any write leaves no empty runs/<recipe>/
            if p.is_dir() and not any(p.iterdir()):
                p.rmdir()


def _resolve_precision(cfg: TrainConfig, rank: int) -> TrainConfig:
    """run.precision as this device trains it (auto -> bf16 or fp32, detected: infinitrain/hardware.py), with the
    reason on stderr once; config.yaml then records the concrete precision."""
    precision, notice = hardware.precision_for(cfg.run.precision)
    if notice and rank == 0:
        print(("note: " if cfg.run.precision == "auto" else "warning: ") + notice, file=sys.stderr)
    if precision == cfg.run.precision:
        return cfg
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, precision=precision))


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


def _refuse_start(cfg: TrainConfig, run_dir: Path, rank: int, resume: str, resume_from: Path | None) -> None:
    """Collective, before any write: ``--resume none`` on a run that has checkpoints, or a resume with another
    model than the checkpoint's, is refused on every rank in one line."""
    error = None
    if rank == 0 and resume == "none" and ckpt.committed(run_dir / "checkpoints"):
        error = f"{run_dir / 'checkpoints'} already holds checkpoints; use --resume auto or a new --run-dir"
    elif rank == 0 and resume_from is not None:
        error = another_model(cfg, resume_from)
    first = ckpt.agree(error)
    if first:
        raise ConfigError(first)


def another_model(cfg: TrainConfig, checkpoint: Path) -> str | None:
    """Why resuming ``checkpoint`` with this command's model is refused (the fields that differ from the model its
    run's config.yaml records), or None: it would load the weights into another model, or fail half-way."""
    from infinitrain.model.config import ModelConfig

    path = checkpoint.parent.parent / "config.yaml"
    try:
        raw = yaml.safe_load(path.read_text())
        trained = ModelConfig.from_dict(raw["model"], where=f"{path}: model")
    except (OSError, yaml.YAMLError, KeyError, TypeError, ConfigError):
        return None  # no readable record: the weights' shapes are still checked when they load
    if trained == cfg.model:
        return None
    diff = [f"{f.name} {getattr(trained, f.name)!r} -> {getattr(cfg.model, f.name)!r}"
            for f in dataclasses.fields(trained) if getattr(trained, f.name) != getattr(cfg.model, f.name)]
    return (f"{checkpoint}: trained another model than this command's (model.{', model.'.join(diff)}); resume with "
            "the run's model, or start over in a new --run-dir")


def start_run_dir(cfg: TrainConfig, run_dir: Path, ds_config: dict[str, Any]) -> None:
    """Rank 0: the run's resolved recipe (data.path absolute, so `generate`/`eval`/`export` of the run work from any
    directory), its DeepSpeed config, and a copy of the data's tokenizer.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = cfg.to_dict()
    data = cfg.data.path
    if isinstance(data, str):
        resolved["data"]["path"] = str(Path(data).resolve())
        tokenizer = Path(data) / "tokenizer.json"
        if tokenizer.is_file():
            write_atomic(run_dir / "tokenizer.json", tokenizer.read_bytes())
    (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=1))


def _prepare_run_dir(cfg: TrainConfig, run_dir: Path, rank: int, ds_config: dict[str, Any]) -> ckpt.Disks:
    """Rank 0 writes the resolved config (:func:`start_run_dir`); the ranks find which of them share the
    checkpoint disk (refusing node-local disks below ZeRO-3); each disk's leader removes partial saves (collective)."""
    if rank == 0:
        start_run_dir(cfg, run_dir, ds_config)
    disks = ckpt.probe_disks(run_dir / "checkpoints", cfg.run.zero_stage)
    if disks.leader:
        ckpt.clean_partial(run_dir / "checkpoints")
    if rank == 0 and not disks.shared:
        print(f"checkpoints on node-local disks: {disks.describe()} (each disk holds its ranks' files and the "
              "manifest; resume with the same ranks on the same nodes)", file=sys.stderr)
    return disks


def _train_locked(cfg: TrainConfig, run_dir: Path, resume: str, sources, rank: int, world: int,
                  allow_fallback: bool, ds_config: dict[str, Any]) -> dict[str, Any]:
    # Every check comes before the first write: a refused start leaves the run directory as it was.
    train_src, val_src = _checked_sources(cfg, sources, rank)
    resume_from, fallbacks = ckpt.choose(run_dir, resume, allow_fallback)  # checked before the engine is built
    _refuse_start(cfg, run_dir, rank, resume, resume_from)
    disks = _prepare_run_dir(cfg, run_dir, rank, ds_config)
    engine, model = build_engine(cfg, ds_config)
    run = _Run(cfg, run_dir, engine, model, (train_src, val_src), rank, world, disks, resume_from, fallbacks)
    try:
        if run.state.step >= cfg.schedule.steps:  # a finished run: nothing to train, nothing new to report
            return run.finished_before(resume_from)
        while run.state.step < cfg.schedule.steps:
            stats, skipped = run.attempt()
            if not skipped:
                run.log_if_due(stats)
                run.validate_if_due()
                run.save_if_due()
            run.stop_if_signalled()
        return run.finish()
    finally:
        run.close()


def _checked_sources(cfg: TrainConfig, sources, rank: int) -> tuple[SampleSource, SampleSource | None]:
    """The (train, validation) sources of the run, checked against the recipe's sample length and vocabulary
    (rank 0 notes a tokenizer smaller than the model's vocabulary)."""
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
    tokenized = isinstance(cfg.data.path, str) and (Path(cfg.data.path) / "tokenizer.json").is_file()
    if rank == 0 and tokenized and train_src.vocab_size < cfg.model.vocab_size:
        print(f"note: the data's tokenizer has {train_src.vocab_size} tokens, model.vocab_size is "
              f"{cfg.model.vocab_size}: {cfg.model.vocab_size - train_src.vocab_size} output rows are never a "
              f"target (model.vocab_size={train_src.vocab_size} fits the data)", file=sys.stderr)
    return train_src, val_src


class _Run:
    """One training run's parts and policies, each a short method the loop in ``_train`` calls in order: one
    step attempt with its skip accounting, the metrics row, the validation and save schedules, the stop on a
    signal, and the end (final validation and save)."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, engine, model, sources, rank: int, world: int,
                 disks: ckpt.Disks, resume_from: Path | None, fallbacks: list[str]):
        (train_src, val_src), self.train_src = sources, sources[0]
        self.cfg, self.run_dir, self.engine, self.model, self.rank = cfg, run_dir, engine, model, rank
        self.disks = disks
        self.sampler = make_sampler(train_src, micro_batch=cfg.data.micro_batch_size, grad_accum=cfg.data.grad_accum,
                                    rank=rank, world=world, seed=cfg.data.seed)
        self.state = TrainState()
        if resume_from is not None:  # engine, RNG, train state and data cursor of the checkpoint ckpt.choose picked
            self.state = TrainState(**ckpt.load(engine, resume_from)["train_state"])
            self.sampler.load_state_dict(self.state.data)
        self.val = Validation(val_src, cfg.data.val_samples, cfg.data.micro_batch_size, rank, world)
        if not self.val and rank == 0:
            print("note: the data has no validation split: no val_loss (data.val_fraction, or prepare --val-fraction)",
                  file=sys.stderr)
        self.per_dataset = DatasetMetrics(train_src, self.sampler)  # mixtures: tokens and loss per dataset
        self.tokens_per_step = self.sampler.global_batch_size * cfg.sample_len
        self.plain_fp32 = cfg.run.zero_stage == 0 and cfg.run.precision == "fp32"  # no skip check of its own
        self.stop, self.router = _StopFlag(), RouterAccuracy(model)
        if resume_from is not None and rank == 0:  # before the bar starts: its own line
            for skipped_error in fallbacks:
                print(f"warning: skipped a damaged checkpoint (--allow-fallback): {skipped_error}", file=sys.stderr)
            print(f"resuming from {resume_from} (step {self.state.step})", file=sys.stderr)
        self.metrics = Metrics(run_dir, cfg, self.state.step, enabled=rank == 0)
        if resume_from is not None:
            self.metrics.write({"step": self.state.step, "resumed_from": str(resume_from), "fallbacks": fallbacks})
        self.last_saved, self.last_val, self.loss = self.state.step, math.nan, math.nan
        self.window_start, self.window_tokens = time.time(), 0
        self.grad_norm: float | None = None  # computed by attempt() where DeepSpeed keeps none

    def attempt(self):
        """One step attempt: this rank's micro-batches forward and backward, the optimizer step (skipped on a
        non-finite loss or gradient), then the accounting. Returns (reduced stats, skipped)."""
        cfg, state = self.cfg, self.state
        attempt = state.step + state.skipped_total + 1  # step attempts, skipped ones included (fault hooks)
        faults.point("step_start", attempt)
        indices = next_micro_batches(self.sampler, cfg.data.micro_batch_size)
        micro = [collate([self.train_src[i] for i in idx]) for idx in indices]
        stats = reduce_stats(backward_windows(self.engine, micro, segment_len=cfg.model.segment_len,
                                              window=cfg.window, aux_weight=cfg.tbptt.mod_aux_weight, step=attempt))
        bad_loss = bool(stats.nonfinite > 0)
        self.grad_norm = plain_grad_norm(self.engine) if self.plain_fp32 else None  # DeepSpeed keeps none there
        skipped = optimizer_step(self.engine, bad_loss, self.plain_fp32)
        faults.point("after_step", attempt)
        faults.trace({"attempt": attempt, "step": state.step + (not skipped), "skipped": skipped,
                      "ids": [int(i) for mb in micro for i in mb.sample_ids]},
                     module=self.engine.module if faults.tracing() else None)
        if skipped:
            self._skip(bad_loss)
        else:
            self._apply(stats, indices, micro)
        return stats, skipped

    def _skip(self, bad_loss: bool) -> None:
        state = self.state
        state.skipped_total += 1
        state.skipped_in_row += 1
        self.metrics.write({"step": state.step + 1, "skipped": True, "skipped_total": state.skipped_total,
                            "skipped_in_row": state.skipped_in_row,
                            "reason": "non-finite loss" if bad_loss else "non-finite gradient"})
        if state.skipped_in_row >= self.cfg.run.max_nonfinite:
            raise TrainingAborted(f"{state.skipped_in_row} steps in a row had a non-finite loss or gradient "
                                  f"(run.max_nonfinite={self.cfg.run.max_nonfinite}); stopped at step {state.step}")

    def _apply(self, stats, indices: list[list[int]], micro) -> None:
        state = self.state
        state.skipped_in_row = 0
        state.step += 1
        state.tokens += self.tokens_per_step
        self.window_tokens += self.tokens_per_step
        self.loss = float(stats.loss_sum / stats.targets)
        self.per_dataset.add(indices, micro, stats.sample_loss)
        tok_s = self.window_tokens / max(1e-9, time.time() - self.window_start)
        self.metrics.progress(1, loss=f"{self.loss:.4f}", tok_s=f"{tok_s:.0f}")

    def log_if_due(self, stats) -> None:
        """The metrics row, every ``log.every`` steps and at the last one (collective: gathers the gates)."""
        step, model, engine = self.state.step, self.model, self.engine
        if step % self.cfg.log.every and step != self.cfg.schedule.steps:
            return
        gates = gate_values(model)
        elapsed = max(1e-9, time.time() - self.window_start)
        self.metrics.write({
            "step": step, "tokens": self.state.tokens, "loss": self.loss,
            "loss_per_segment": (stats.seg_loss / stats.seg_targets.clamp(min=1)).tolist(),
            "lr": engine.lr_scheduler.get_last_lr()[0], "gate_lr": engine.lr_scheduler.get_last_lr()[-1],
            "grad_norm": self.grad_norm if self.plain_fp32 else _float_or_none(engine.get_global_grad_norm()),
            "tokens_per_s": self.window_tokens / elapsed,
            "peak_mem_mb": peak_memory_mb(), "mod_aux_loss": float(stats.aux),
            "mod_router_acc": self.router.take(), "gates": gates,
            **({"memory_tau": gate_values(model, model.tau_parameters(), torch.exp)}
               if model.tau_parameters() else {}),
            "skipped_total": self.state.skipped_total, **self.per_dataset.row()})
        self.window_start, self.window_tokens = time.time(), 0

    def should_validate(self, step: int) -> bool:
        return bool(self.val) and bool(self.cfg.log.eval_every) and step % self.cfg.log.eval_every == 0

    def validate(self) -> None:
        S, W = self.cfg.model.segment_len, self.cfg.window
        self.last_val, per_val = self.val.run(lambda batches: evaluate(self.engine, batches, segment_len=S, window=W))
        self.metrics.write({"step": self.state.step, "val_loss": self.last_val, **per_val})

    def validate_if_due(self) -> None:
        if self.should_validate(self.state.step):
            self.validate()

    def save(self) -> Path:
        self.state.data = self.sampler.state_dict()
        path = ckpt.save(self.engine, self.run_dir / "checkpoints", self.state.step,
                         {"train_state": dataclasses.asdict(self.state)}, self.cfg.checkpoint.keep_last, self.disks)
        self.last_saved = self.state.step
        return path

    def save_if_due(self) -> None:
        every = self.cfg.checkpoint.save_every
        if every and self.state.step % every == 0:
            self.save()

    def latest_or_save(self) -> Path:
        """The committed checkpoint of this step, saved now unless it already is."""
        done = ckpt.committed(self.run_dir / "checkpoints")
        return done[-1] if self.last_saved == self.state.step and done else self.save()

    def stop_if_signalled(self) -> None:
        """SIGTERM/SIGINT on any rank: save (unless this step is saved) and raise Preempted on every rank."""
        faults.signal_after(self.state.step)
        signum = self.stop.agreed()
        if signum:
            raise Preempted(signum, self.latest_or_save())

    def finish(self) -> dict[str, Any]:
        """Validate the last step (unless the schedule just did), save it, and summarise the run."""
        if self.val and not self.should_validate(self.state.step):
            self.validate()
        path = self.latest_or_save()
        s = self.state
        return {"step": s.step, "tokens": s.tokens, "loss": self.loss, "val_loss": self.last_val if self.val else None,
                "skipped_total": s.skipped_total, "checkpoint": str(path) if path else None}

    def finished_before(self, checkpoint: Path) -> dict[str, Any]:
        """The summary of a run resumed at or past its last step: nothing trained, no new loss."""
        s = self.state
        return {"step": s.step, "tokens": s.tokens, "loss": None, "val_loss": None, "finished_before": True,
                "skipped_total": s.skipped_total, "checkpoint": str(checkpoint)}

    def close(self) -> None:
        self.metrics.close()
        self.stop.restore()
