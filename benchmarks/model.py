"""Whole-model training speed side by side: infinitrain (a plain step and the real trainer) vs transformers' Llama.

Reproduce (one process; contenders alternate; `uptime` printed before and after):

    .venv/bin/python benchmarks/model.py --lengths 2k,8k --precisions fp32 --rounds 2   # quick, ~5 min quiet
    .venv/bin/python benchmarks/model.py --json model.json                               # 2K/8K/32K x fp32/bf16

The model is the speed issue's 58 M shape: 8 layers, d 512, 8 heads (``--kv-heads`` for GQA), SwiGLU FFN 1408,
vocab 32000, RoPE, untied head; infinitrain with segment 512 and the linear rule. Contenders (batch 1, random ids):

* ``hf``: transformers' ``LlamaForCausalLM`` (SDPA, full causal attention over the sample): forward with labels,
  backward, AdamW;
* ``infini``: ``InfiniLM``, the same plain step over TBPTT windows of ``--window`` segments (the memory state carried
  and detached between windows, one backward per window), then AdamW;
* ``trainer``: the real trainer's step: DeepSpeed ZeRO-3 on one rank, ``backward_windows`` + ``engine.step``, under
  the run's determinism settings (``run.deterministic: true``).

Precision bf16: the plain contenders hold bf16 weights (AdamW on them, no master copy); the trainer is DeepSpeed's
bf16 (bf16 model, fp32 master weights and optimizer), what ``run.precision: bf16`` runs. Per sample length every
contender is built, stepped once to warm up, then timed over ``--rounds`` rounds, one step each in a fresh random
order. Reported: best and median tok/s, the kernel's share of the step's CPU time (sys / (user + sys)), and MFU =
model FLOP/s over the matmul peak of the step's precision, measured in the same run (best 2048³ matmul of each
round, ``--peak-n``). Model FLOPs per token: 6 × matmul parameters (the head included, the embedding not) + 6 × layers ×
heads ×
head dim × (T for full causal attention, S for Infini's local attention) + 12 × layers × heads × head dim² (the
memory). ``hf`` is skipped where its predicted step time exceeds ``--max-step-s`` (extrapolated from the shorter
lengths, quadratic when only one is known) or its predicted memory (logits and activations) exceeds the available
memory. On a shared machine absolute figures move with the load; the ratios within a length are the result.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from infinitrain import hardware  # first: it sets torch's allocator options (huge pages) before torch loads
import torch

CONTENDERS = ("hf", "infini", "trainer")
NATIVE_LINEAR = torch.nn.functional.linear  # DeepSpeed's ZeRO-3 engine replaces it process-wide; see plain()
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Shape:
    layers: int = 8
    d_model: int = 512
    heads: int = 8
    kv_heads: int = 8
    ffn: int = 1408
    vocab: int = 32000
    segment: int = 512
    update: str = "linear"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    def matmul_params(self) -> int:
        K, D = self.head_dim, self.d_model
        per_layer = D * (self.heads + 2 * self.kv_heads) * K + self.heads * K * D + 3 * D * self.ffn
        return self.layers * per_layer + D * self.vocab

    def flops_per_token(self, contender: str, T: int) -> float:
        HK = self.heads * self.head_dim
        if contender == "hf":
            return 6 * self.matmul_params() + 6 * self.layers * HK * T
        return 6 * self.matmul_params() + 6 * self.layers * HK * self.segment + 12 * self.layers * HK * self.head_dim


@dataclass
class Cell:
    contender: str
    precision: str
    T: int
    step: Callable[[torch.Tensor, torch.Tensor], None]
    times: list[float] = field(default_factory=list)
    sys_share: list[float] = field(default_factory=list)
    note: str = ""


# ---------------------------------------------------------------------------------------------
# The contenders: each a step (ids (1, T+1), doc_start (1, T)) -> None that trains once
# ---------------------------------------------------------------------------------------------


def plain(step):
    """Run ``step`` with torch's own F.linear: a ZeRO-3 engine built in this process swapped in DeepSpeed's
    LinearFunctionForZeroStage3 for every later nn.Linear (``memory_efficient_linear``), which the plain contenders
    must not measure."""
    def run(ids, doc):
        engine_linear, torch.nn.functional.linear = torch.nn.functional.linear, NATIVE_LINEAR
        try:
            step(ids, doc)
        finally:
            torch.nn.functional.linear = engine_linear
    return run


def adamw(params):
    """The trainer's AdamW (fused where torch has the kernel) for the plain contenders too."""
    from infinitrain.train.engine import adamw as trainer_adamw

    return trainer_adamw([{"params": list(params)}], lr=1e-4)


def hf_step(shape: Shape, dtype: torch.dtype, T: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.d_model, intermediate_size=shape.ffn,
                      num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                      num_key_value_heads=shape.kv_heads, max_position_embeddings=max(T, 2048), rms_norm_eps=1e-5,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype).train()
    opt = adamw(model.parameters())

    def step(ids, doc):
        model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return plain(step)


def model_config(shape: Shape):
    from infinitrain.model.config import ModelConfig

    return ModelConfig(vocab_size=shape.vocab, d_model=shape.d_model, n_layers=shape.layers, n_heads=shape.heads,
                       n_kv_heads=shape.kv_heads, d_ff=shape.ffn, segment_len=shape.segment, update=shape.update)


def infini_step(shape: Shape, dtype: torch.dtype, T: int, window: int):
    from infinitrain.model import InfiniLM

    torch.manual_seed(0)
    model = InfiniLM(model_config(shape)).to(dtype).train()
    opt = adamw(model.parameters())
    span = (window or T // shape.segment) * shape.segment

    def step(ids, doc):
        inp, tgt, state = ids[:, :-1], ids[:, 1:], None
        for a in range(0, T, span):
            out = model(inp[:, a:a + span], state, doc_start=doc[:, a:a + span], targets=tgt[:, a:a + span])
            (out.loss_sum / tgt.numel()).backward()
            state = out.state.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return plain(step)


def trainer_step(shape: Shape, precision: str, T: int, window: int):
    from infinitrain.train.config import TrainConfig
    from infinitrain.train.data import Batch
    from infinitrain.train.engine import build_engine, deepspeed_config
    from infinitrain.train.loop import _configure_determinism
    from infinitrain.train.step import backward_windows

    cfg = TrainConfig.from_dict({
        "model": model_config(shape).to_dict(),
        "data": {"segments_per_sample": T // shape.segment, "micro_batch_size": 1},
        "tbptt": {"window": min(window, T // shape.segment), "checkpointing": "none"},
        "run": {"precision": precision, "zero_stage": 3}})
    engine, _ = build_engine(cfg, deepspeed_config(cfg, 1))
    ones = torch.ones(1, T, dtype=torch.bool)

    def step(ids, doc):
        restore = _configure_determinism(cfg, 0)
        try:
            mb = Batch(ids[:, :-1], ids[:, 1:], ones, doc, torch.arange(1))
            backward_windows(engine, [mb], segment_len=shape.segment, window=cfg.window, aux_weight=0.0)
            engine.step()
        finally:
            restore()
    step.engine = engine
    return step


# ---------------------------------------------------------------------------------------------
# Measuring: peaks, load, one timed step
# ---------------------------------------------------------------------------------------------


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 3) -> float:
    """Best FLOP/s of an n³ matmul in ``dtype`` (oneDNN/AMX for bf16 where the CPU has it)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return 1 << 62


def timed(cell: Cell, ids: torch.Tensor, doc: torch.Tensor) -> float:
    t0, c0 = time.perf_counter(), os.times()
    cell.step(ids, doc)
    dt, c1 = time.perf_counter() - t0, os.times()
    user, sys_ = c1.user - c0.user, c1.system - c0.system
    cell.sys_share.append(sys_ / max(1e-9, user + sys_))
    return dt


def hf_skip(shape: Shape, precision: str, T: int, known: dict[int, float], max_step_s: float) -> str:
    """Why the full-attention model is not run at T ("" to run it): its predicted step time or memory."""
    nbytes = 4 if precision == "fp32" else 2
    need = 3 * 4 * T * shape.vocab + 24 * nbytes * shape.layers * T * shape.d_model  # fp32 logits ×3 + layers
    if need > 0.8 * mem_available():
        return f"skipped: needs ~{need / 2**30:.0f} GiB, {mem_available() / 2**30:.0f} GiB available"
    pts = sorted(known.items())
    if not pts:
        return ""
    if len(pts) == 1:
        (t1, s1), = pts
        pred = s1 * (T / t1) ** 2
    else:
        (t1, s1), (t2, s2) = pts[-2:]  # s = a T + b T² through the two longest
        b = (s2 / t2 - s1 / t1) / (t2 - t1)
        a = s1 / t1 - b * t1
        pred = max(a * T + b * T * T, s2 * T / t2)
    return f"skipped: predicted {pred:.0f} s a step > --max-step-s {max_step_s:.0f}" if pred > max_step_s else ""


def build(contender: str, shape: Shape, precision: str, T: int, window: int):
    if contender == "hf":
        return hf_step(shape, PRECISIONS[precision], T)
    if contender == "infini":
        return infini_step(shape, PRECISIONS[precision], T, window)
    return trainer_step(shape, precision, T, window)


def profile_step(cell: Cell, ids, doc, rows: int) -> dict:
    """One step under torch.profiler: the top ops by self CPU time, each with its share of the step's self time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        cell.step(ids, doc)
    avg = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in avg) or 1
    return {"self_cpu_s": total / 1e6, "top": [
        {"op": e.key, "share": e.self_cpu_time_total / total, "calls": e.count, "self_s": e.self_cpu_time_total / 1e6}
        for e in avg[:rows]]}


def run_length(T: int, args, shape: Shape, hf_known: dict, peaks: dict, gen: torch.Generator) -> list[dict]:
    """Build every (contender, precision) cell at length T, warm each up once, time ``rounds`` shuffled rounds."""
    cells = []
    for precision in args.precisions:
        for contender in args.contenders:
            note = hf_skip(shape, precision, T, hf_known[precision], args.max_step_s) if contender == "hf" else ""
            step = None if note else build(contender, shape, precision, T, args.window)
            cells.append(Cell(contender, precision, T, step, note=note))
    live = [c for c in cells if c.step is not None]
    ids = torch.randint(0, shape.vocab, (1, T + 1), generator=gen)
    doc = torch.zeros(1, T, dtype=torch.bool)
    doc[:, 0] = True
    for c in live:
        _log(f"T={T} {c.precision} {c.contender}: warm-up")
        first = timed(c, ids, doc)
        c.sys_share.clear()
        if c.contender == "hf":
            hf_known[c.precision][T] = first
    for r in range(args.rounds):
        for p in args.precisions:
            peaks[p] = max(peaks.get(p, 0.0), matmul_peak(PRECISIONS[p], args.peak_n))
        for c in random.sample(live, len(live)):
            c.times.append(timed(c, ids, doc))
            _log(f"T={T} round {r + 1} {c.precision} {c.contender}: {T / c.times[-1]:.0f} tok/s")
    rows = [row(c, shape, peaks) for c in cells]
    if args.profile:
        for c, r in zip(cells, rows):
            if c.step is not None:
                r["profile"] = profile_step(c, ids, doc, args.profile)
    for c in cells:
        if getattr(c.step, "engine", None) is not None:
            c.step.engine.destroy()
    return rows


def row(c: Cell, shape: Shape, peaks: dict) -> dict:
    r = {"contender": c.contender, "precision": c.precision, "T": c.T, "note": c.note}
    if c.times:
        best, med = c.T / min(c.times), c.T / statistics.median(c.times)
        r.update(best_tok_s=best, median_tok_s=med, steps=len(c.times), sys_share=statistics.median(c.sys_share),
                 mfu=best * shape.flops_per_token(c.contender, c.T) / peaks[c.precision])
    return r


def ratios(rows: list[dict], args) -> list[dict]:
    """infini/hf, trainer/hf, trainer/infini at each (T, precision); bf16/fp32 of each contender; each contender's
    tok/s at T over its tok/s at the shortest length (flat in T = 1.0)."""
    get = {(r["contender"], r["precision"], r["T"]): r.get("best_tok_s") for r in rows}
    out = []

    def add(name, a, b):
        if get.get(a) and get.get(b):
            out.append({"ratio": name, "best": get[a] / get[b]})
    lengths = sorted({r["T"] for r in rows})
    for T in lengths:
        for p in args.precisions:
            for a, b in (("infini", "hf"), ("trainer", "hf"), ("trainer", "infini")):
                add(f"{a} / {b} {p} T={_k(T)}", (a, p, T), (b, p, T))
        for c in args.contenders:
            add(f"{c} bf16 / fp32 T={_k(T)}", (c, "bf16", T), (c, "fp32", T))
    for T in lengths[1:]:
        for p in args.precisions:
            for c in args.contenders:
                add(f"{c} {p} T={_k(T)} / T={_k(lengths[0])}", (c, p, T), (c, p, lengths[0]))
    return out


def _k(T: int) -> str:
    return f"{T // 1024}K" if T % 1024 == 0 else str(T)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def format_report(rep: dict) -> str:
    lines = [f"machine: {rep['machine']['cpu']}; flags {' '.join(rep['machine']['flags']) or 'none seen'}; "
             f"bf16 unit: {rep['machine']['bf16_unit'] or 'none (bf16 emulated)'}; {rep['threads']} threads",
             f"load before: {rep['uptime_before']}", f"load after:  {rep['uptime_after']}",
             f"matmul peaks (best {rep['peak_n']}³ of the run): " + ", ".join(
                 f"{p} {v / 1e9:.0f} GFLOP/s" for p, v in rep["peaks"].items()),
             f"shape: {rep['shape']}; window {rep['window'] or 'whole sample'} segments",
             f"{'T':>5} {'prec':>5} {'contender':>9} {'best tok/s':>10} {'median':>8} {'MFU':>6} {'sys':>5}  note"]
    for r in rep["results"]:
        if "best_tok_s" in r:
            lines.append(f"{_k(r['T']):>5} {r['precision']:>5} {r['contender']:>9} {r['best_tok_s']:>10.0f} "
                         f"{r['median_tok_s']:>8.0f} {r['mfu']:>6.1%} {r['sys_share']:>5.0%}  {r['note']}")
        else:
            lines.append(f"{_k(r['T']):>5} {r['precision']:>5} {r['contender']:>9} {'-':>10} {'-':>8} {'-':>6} "
                         f"{'-':>5}  {r['note']}")
    lines += [f"{x['ratio']:<34} {x['best']:.2f}" for x in rep["ratios"]]
    for r in rep["results"]:
        if "profile" in r:
            lines.append(f"profile {r['contender']} {r['precision']} T={_k(r['T'])} "
                         f"({r['profile']['self_cpu_s']:.1f} s self CPU):")
            lines += [f"  {o['share']:6.1%} {o['calls']:>7} {o['op']}" for o in r["profile"]["top"]]
    lines.append("reproduce: .venv/bin/python benchmarks/model.py " + " ".join(rep["argv"]))
    return "\n".join(lines)


def parse_length(x: str) -> int:
    x = x.strip().lower()
    return int(x[:-1]) * 1024 if x.endswith("k") else int(x)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="2k,8k,32k", help="sample lengths, multiples of --segment (2k = 2048)")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--window", type=int, default=4, help="W segments per backward (0: the whole sample)")
    p.add_argument("--max-step-s", type=float, default=120.0, help="skip hf where a step is predicted longer")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--peak-n", type=int, default=2048, help="matrix size of the peak matmuls")
    p.add_argument("--profile", type=int, default=0, help="after timing, profile one step per cell: top N ops")
    for f in Shape.__dataclass_fields__.values():
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    a.lengths = [parse_length(x) for x in a.lengths.split(",")]
    a.precisions = [x for x in a.precisions.split(",") if x]
    a.contenders = [x for x in a.contenders.split(",") if x]
    bad = [x for x in a.precisions if x not in PRECISIONS] + [x for x in a.contenders if x not in CONTENDERS]
    if bad:
        p.error(f"unknown precision or contender {bad[0]!r} (precisions {', '.join(PRECISIONS)}; "
                f"contenders {', '.join(CONTENDERS)})")
    if any(T % a.segment for T in a.lengths):
        p.error(f"every length must be a multiple of --segment {a.segment}")
    return a


def run(args, argv: list[str]) -> dict:
    torch.set_num_threads(args.threads)
    shape = Shape(**{k: getattr(args, k) for k in Shape.__dataclass_fields__})
    if "trainer" in args.contenders:
        from infinitrain.train.engine import init_distributed, setup_environment

        setup_environment()
        if not torch.distributed.is_initialized():
            init_distributed()
    rep = {"machine": hardware.describe(), "threads": args.threads, "uptime_before": uptime(), "argv": argv,
           "shape": vars(shape) | {"params": shape.matmul_params() + shape.vocab * shape.d_model},
           "window": args.window, "peaks": {}, "peak_n": args.peak_n}
    hf_known = {p: {} for p in args.precisions}
    gen, results = torch.Generator().manual_seed(0), []
    random.seed(0)
    for T in args.lengths:
        results += run_length(T, args, shape, hf_known, rep["peaks"], gen)
        gc.collect()
    rep.update(results=results, ratios=ratios(results, args), uptime_after=uptime())
    return rep


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    rep = run(args, argv)
    print(format_report(rep))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=1)
    return rep


if __name__ == "__main__":
    main()
