"""Forward+backward tokens/s and saved-for-backward memory of one Infini attention layer vs local-only, full causal
SDPA, the naive loop and the MEGALODON layer.

Reproduce (default: ``--level both``, T = 2K, 8K, 32K, 5 rounds; 263 s on 2 quiet cores, about 10 minutes when
the machine is loaded; ``--quick`` is a smoke run up to T=8K with 2 rounds; ``--profile 30`` adds op tables):

    .venv/bin/python benchmarks/attention.py --json out.json

Implementations, each timed as forward+backward (``--level layer``: with the q/k/v/o projections, i.e. the
``InfiniAttention`` module; ``--level op``: the core op on given q/k/v; ``--level both``):

* ``infini-linear`` / ``infini-delta``: ``infini_attention`` fast path (``InfiniAttention.forward`` at layer level);
* ``local-only``: the same layer with the memory path removed (RoPE + block-diagonal causal SDPA, ``local_attention``);
* ``full-causal``: RoPE + one causal SDPA over all T tokens (measured once when a single run is already long);
* ``naive-linear``: ``infini_attention_naive`` (loops over segments and heads; small T only);
* ``megalodon``: the MEGALODON layer (``MegalodonAttention``: timestep norm, CEMA with 16 dims per channel, shared
  Z, normalised attention inside chunks of --segment, gates) with the same D = H·d, H heads, Z = d per head and
  values H·d as the Infini rows (layer level only: it has no q/k/v core op to compare);
* ``seed-linear``: the seed implementation's algorithm (dingo-actual/infini-transformer ``CompressiveMemory``,
  re-stated in ``op_seed``): a segment loop slicing q/k/v, an explicit unmasked softmax attention, the memory
  written before it is read; at layer level inside our projections.

For each T (ascending) every cell is warmed up once, then timed over ``--rounds`` rounds, each round in a fresh
random order; throughput is reported as best (the machine's limit; prefer it on a shared machine) and median.
Memory: bytes of the unique storages saved for backward, recorded with ``saved_tensors_hooks`` during the warm-up
(parameters and inputs excluded; deterministic, any device); on CUDA also ``torch.cuda.max_memory_allocated``
minus the allocation before the pass; on CPU with ``--rss`` the peak-RSS delta of one forward+backward in a fresh
process (in-process RSS is useless here: the allocator keeps freed pages of earlier cells).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from infinitrain.model.config import ModelConfig
from infinitrain.model.layers import InfiniAttention
from infinitrain.model.megalodon import MegalodonAttention
from infinitrain.ops.memory import infini_attention, infini_attention_naive, local_attention, _expand_kv
from infinitrain.ops.rope import RotarySpec, apply_rotary

IMPLS = ("infini-linear", "infini-delta", "local-only", "full-causal", "naive-linear", "megalodon", "seed-linear")
MiB = 2.0 ** 20


# ---------------------------------------------------------------------------------------------
# The implementations: core ops on (q, k, v, beta) and layers on x
# ---------------------------------------------------------------------------------------------


def _segment_rope(q: Tensor, k: Tensor, segment_len: int, rotary: RotarySpec | None) -> tuple[Tensor, Tensor]:
    if rotary is None:
        return q, k
    pos = torch.arange(q.shape[2], device=q.device) % segment_len
    return apply_rotary(q, pos, rotary), apply_rotary(k, pos, rotary)


def op_local(q, k, v, beta, *, segment_len, rotary):
    q, k = _segment_rope(q, k, segment_len, rotary)
    return local_attention(q, k, v, segment_len)


def op_full(q, k, v, beta, *, segment_len, rotary):
    if rotary is not None:
        pos = torch.arange(q.shape[2], device=q.device)  # positions run over the whole sequence
        q, k = apply_rotary(q, pos, rotary), apply_rotary(k, pos, rotary)
    H = q.shape[1]
    return F.scaled_dot_product_attention(q, _expand_kv(k, H), _expand_kv(v, H), is_causal=True)


def op_seed(q, k, v, beta, *, segment_len, rotary):
    """The seed implementation's algorithm (dingo-actual/infini-transformer ``CompressiveMemory.forward``,
    re-stated here: it is not a dependency), linear rule, on our q/k/v: a Python loop over segments that slices
    q/k/v, writes the segment into the memory with σ(Q)ᵀV *before* reading it, reads σ(Q)M / σ(Q)z, and runs an
    explicit softmax(QKᵀ/√K)V with no causal mask and no RoPE, mixed by sigmoid(β). Its errors are kept on
    purpose (this row measures its cost, not its output); z starts at 0 as ours, plus ε so it stays finite."""
    H, S = q.shape[1], segment_len
    k, v = _expand_kv(k, H), _expand_kv(v, H)
    B, _, T, K = q.shape
    mem = q.new_zeros(B, H, K, v.shape[-1])
    z = q.new_zeros(B, H, K, 1)
    g = torch.sigmoid(beta).view(1, H, 1, 1)
    out = []
    for a in range(0, T, S):
        qs, ks, vs = q[:, :, a:a + S], k[:, :, a:a + S], v[:, :, a:a + S]
        sq = F.elu(qs) + 1.0
        mem = mem + sq.transpose(-2, -1) @ vs
        z = z + (F.elu(ks) + 1.0).sum(dim=-2, keepdim=True).transpose(-2, -1)
        att_dot = torch.softmax(qs @ ks.transpose(-2, -1) / math.sqrt(K), dim=-1) @ vs
        att_mem = (sq @ mem) / (sq @ z + 1e-6)
        out.append(g * att_mem + (1 - g) * att_dot)
    return torch.cat(out, 2)


def _infini(update: str, fn=infini_attention):
    def run(q, k, v, beta, *, segment_len, rotary):
        return fn(q, k, v, beta, segment_len=segment_len, update=update, rotary=rotary)[0]
    return run


OPS: dict[str, Callable] = {
    "infini-linear": _infini("linear"),
    "infini-delta": _infini("delta"),
    "local-only": op_local,
    "full-causal": op_full,
    "naive-linear": _infini("linear", infini_attention_naive),
    "seed-linear": op_seed,
}


class CoreLayer(torch.nn.Module):
    """``InfiniAttention``'s projections around another core op (the memory path removed, full attention, naive)."""

    def __init__(self, attn: InfiniAttention, op: Callable):
        super().__init__()
        self.attn, self.op = attn, op

    def forward(self, x: Tensor) -> Tensor:
        a = self.attn
        q, k, v = a.project(x)
        return a.merge(self.op(q, k, v, a.betas, segment_len=a.segment_len, rotary=a.rotary))


class InfiniLayer(torch.nn.Module):
    """The real ``InfiniAttention.forward`` (streaming entry point; whole segments take the fast path), or
    ``MegalodonAttention.forward``: x -> the layer's output, the state dropped."""

    def __init__(self, attn: InfiniAttention | MegalodonAttention):
        super().__init__()
        self.attn = attn

    def forward(self, x: Tensor) -> Tensor:
        return self.attn(x)[0]


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


@dataclass
class Cell:
    level: str
    impl: str
    T: int
    step: Callable[[], None]  # one forward+backward
    keep: set  # storage pointers of parameters and inputs (not counted as saved activations)
    reps: int = 1
    times: list = field(default_factory=list)  # seconds per forward+backward, one entry per run
    first: float = math.nan
    saved_bytes: int | None = None
    peak_bytes: int | None = None  # CUDA: max_memory_allocated delta; CPU with --rss: peak-RSS delta
    note: str = ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def measure_first(cell: Cell, device: torch.device) -> None:
    """Warm-up run that also records the saved-for-backward bytes (and the CUDA peak)."""
    seen: dict[int, int] = {}

    def pack(t: Tensor):
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr not in cell.keep and ptr not in seen:
            seen[ptr] = s.nbytes()
        return t

    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        cell.step()
    _sync(device)
    cell.first = time.perf_counter() - t0
    cell.saved_bytes = sum(seen.values())
    if device.type == "cuda":
        cell.peak_bytes = torch.cuda.max_memory_allocated(device) - base


def profile_cell(cell: Cell, device: torch.device, rows: int, steps: int = 3) -> str:
    """torch.profiler table (ops by self time, grouped by input shape) over a few forward+backward steps."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=True) as prof:
        for _ in range(steps):
            cell.step()
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=rows, max_name_column_width=40,
                                                              max_shapes_column_width=60)


def time_cell(cell: Cell, device: torch.device) -> None:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(cell.reps):
        cell.step()
    _sync(device)
    cell.times.append((time.perf_counter() - t0) / cell.reps)


def _load() -> dict:
    """Load average and CPU pressure (PSI 'some': % of time runnable tasks waited for a CPU), when available."""
    out = {"loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None, "cpu_pressure": None}
    try:
        with open("/proc/pressure/cpu") as f:
            some = f.readline().split()[1:4]  # avg10 avg60 avg300
        out["cpu_pressure"] = [float(x.split("=")[1]) for x in some]
    except (OSError, IndexError, ValueError):
        pass
    return out


def _rss_kib(name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise OSError(f"{name} not in /proc/self/status")


def rss_delta(level: str, impl: str, T: int, argv: list[str]) -> int | None:
    """Peak RSS of one forward+backward in a fresh process, minus its RSS after building the inputs (bytes)."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--rss-cell", f"{level}:{impl}:{T}"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        return int(out.strip().splitlines()[-1])
    except (subprocess.CalledProcessError, ValueError, IndexError) as e:
        _log(f"rss {level} {impl} T={T}: failed ({e})")
        return None


def _rss_child(args) -> None:
    level, impl, T = args.rss_cell.split(":")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    cell = make_cell(level, impl, int(T), args, device, torch.Generator().manual_seed(args.seed))
    cell.step()  # warm-up: library buffers and thread pools are not the cell's memory
    try:
        ctypes.CDLL(None).malloc_trim(0)  # glibc: hand freed heap pages back, so the delta is this step's
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    base = _rss_kib("VmRSS")
    cell.step()
    print((_rss_kib("VmHWM") - base) * 1024)


def make_cell(level: str, impl: str, T: int, args, device: torch.device, gen: torch.Generator) -> Cell:
    B, H, G, K, S = args.batch, args.heads, args.kv_heads, args.head_dim, args.segment
    dtype = getattr(torch, args.dtype)
    rotary = None if args.no_rope else RotarySpec(head_dim=K, rot_dim=K)
    if level == "layer":
        update = "delta" if impl == "infini-delta" else "linear"
        attn = InfiniAttention(H * K, H, G, K, segment_len=S, update=update, rotary=rotary)
        if impl == "megalodon":
            attn = MegalodonAttention(megalodon_config(args))
        attn = attn.to(device=device, dtype=dtype)
        module = InfiniLayer(attn) if impl.startswith(("infini-", "megalodon")) else CoreLayer(attn, OPS[impl])
        x = torch.randn(B, T, H * K, generator=gen).to(device, dtype).requires_grad_()
        grad = torch.randn(B, T, H * K, generator=gen).to(device, dtype)
        inputs = [x, *module.parameters()]

        def step():
            for p in inputs:
                p.grad = None
            module(x).backward(grad)
    else:
        q = torch.randn(B, H, T, K, generator=gen).to(device, dtype).requires_grad_()
        k = torch.randn(B, G, T, K, generator=gen).to(device, dtype).requires_grad_()
        v = torch.randn(B, G, T, K, generator=gen).to(device, dtype).requires_grad_()
        beta = torch.zeros(H, device=device, dtype=dtype).requires_grad_()
        grad = torch.randn(B, H, T, K, generator=gen).to(device, dtype)
        inputs = [q, k, v, beta]
        op = OPS[impl]

        def step():
            for p in inputs:
                p.grad = None
            op(q, k, v, beta, segment_len=S, rotary=rotary).backward(grad)
    keep = {p.untyped_storage().data_ptr() for p in inputs}
    return Cell(level, impl, T, step, keep)


def megalodon_config(args) -> ModelConfig:
    """A MEGALODON layer of the Infini rows' sizes: D = H·d, H heads, Z = d per head, values H·d, chunk = segment."""
    D = args.heads * args.head_dim
    return ModelConfig(arch="megalodon", vocab_size=2, n_layers=1, d_model=D, n_heads=args.heads,
                       head_dim=args.head_dim, v_dim=D, d_ff=1, ema_dim=16, norm_groups=math.gcd(32, D),
                       segment_len=args.segment, pos_emb="none" if args.no_rope else "rope")


def _skip_reason(impl: str, T: int, args, level: str = "layer") -> str:
    if impl == "megalodon" and level == "op":
        return "skipped: layer level only"
    if impl == "full-causal" and T > args.full_max_t:
        return f"skipped: T > --full-max-t {args.full_max_t}"
    if impl == "naive-linear" and T > args.naive_max_t:
        return f"skipped: slow loop, T > --naive-max-t {args.naive_max_t}"
    return ""


def run(args, argv: list[str] | None = None) -> dict:
    """Per T (ascending): build the cells, warm each up once (memory pass), then time them in rounds, each round
    in a fresh random order. Full causal attention is skipped when a run is estimated over --full-budget and run
    once when a run takes over --once-above."""
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    levels = ("op", "layer") if args.level == "both" else (args.level,)
    load_before = _load()
    t_start = time.perf_counter()
    done: list[Cell] = []
    profiles: dict[str, str] = {}
    for T in sorted(args.T):
        if T % args.segment:
            raise SystemExit(f"T={T} is not a multiple of the segment length {args.segment}")
        cells = _cells_at(T, levels, done, args, device, gen)
        _measure(T, cells, args, device, rng, t_start, profiles, argv)
        for cell in cells:
            cell.step = None  # free the inputs of this T
        done += cells
        _log(f"T={T}: done ({time.perf_counter() - t_start:.0f} s)")
    elapsed = time.perf_counter() - t_start
    env = dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
               cpu_count=os.cpu_count(), load_before=load_before, load_after=_load(), elapsed_s=elapsed, argv=sys.argv)
    return _report(done, levels, args, device, env, profiles)


def _cells_at(T: int, levels: tuple[str, ...], done: list[Cell], args, device, gen) -> list[Cell]:
    """The cells of one T: skipped ones carry their reason (full causal attention estimated from the last T)."""
    cells = []
    for level in levels:
        for impl in args.impls:
            cell = Cell(level, impl, T, lambda: None, set(), note=_skip_reason(impl, T, args, level))
            prev = [c for c in done if c.level == level and c.impl == impl and c.times]
            if impl == "full-causal" and not cell.note and prev:  # quadratic: estimate from the last T
                p = max(prev, key=lambda c: c.T)
                est = min(p.times) * (T / p.T) ** 2
                if est > args.full_budget:
                    cell.note = f"skipped: estimated {est:.0f} s per run > --full-budget {args.full_budget:g} s"
            if not cell.note:
                cell = make_cell(level, impl, T, args, device, gen)
            cells.append(cell)
    return cells


def _measure(T: int, cells: list[Cell], args, device, rng, t_start: float, profiles: dict[str, str],
             argv: list[str] | None) -> None:
    """Warm every live cell up once in random order, then time them in ``args.rounds`` shuffled rounds; profiles
    and peak RSS where asked."""
    live = [c for c in cells if not c.note]
    rng.shuffle(live)
    for cell in live:
        measure_first(cell, device)
        if cell.first > args.once_above:
            cell.times.append(cell.first)
            cell.note = f"measured once ({cell.first:.0f} s per run > --once-above {args.once_above:g} s)"
        else:
            cell.reps = max(1, min(20, round(args.min_time / max(cell.first, 1e-6))))
    timed = [c for c in live if not c.times]
    _log(f"T={T}: warm-up done ({time.perf_counter() - t_start:.0f} s); {args.rounds} rounds of {len(timed)} cells")
    for _ in range(args.rounds):
        rng.shuffle(timed)
        for cell in timed:
            time_cell(cell, device)
    if args.profile and T == args.ratio_local_t:
        for cell in sorted(live, key=lambda c: (c.level, c.impl)):
            if cell.impl in ("infini-linear", "local-only"):
                profiles[f"{cell.level} {cell.impl} T={T}"] = profile_cell(cell, device, args.profile)
    if args.rss and device.type == "cpu":
        for cell in live:
            cell.peak_bytes = rss_delta(cell.level, cell.impl, T, argv or [])


def _report(done: list[Cell], levels: tuple[str, ...], args, device, env: dict, profiles: dict[str, str]) -> dict:
    results = []
    for cell in sorted(done, key=lambda c: (levels.index(c.level), c.T, IMPLS.index(c.impl))):
        r = dict(level=cell.level, impl=cell.impl, T=cell.T, note=cell.note, runs=len(cell.times),
                 reps_per_run=cell.reps, seconds=cell.times, saved_bytes=cell.saved_bytes,
                 peak_bytes=cell.peak_bytes)
        if cell.times:
            tok = args.batch * cell.T
            r["best_tok_s"] = tok / min(cell.times)
            r["median_tok_s"] = tok / statistics.median(cell.times)
        results.append(r)
    peak = ("max_memory_allocated delta" if device.type == "cuda" else
            "peak-RSS delta of one fwd+bwd in a fresh process after a warm-up" if args.rss
            else "not measured (use --rss)")
    return dict(
        config=dict(device=str(device), dtype=args.dtype, batch=args.batch, heads=args.heads,
                    kv_heads=args.kv_heads, head_dim=args.head_dim, segment=args.segment, T=args.T,
                    rope=not args.no_rope, threads=torch.get_num_threads(), rounds=args.rounds,
                    levels=list(levels), impls=list(args.impls), seed=args.seed, peak_memory=peak),
        env=env,
        results=results,
        ratios=ratios(results, args),
        profiles=profiles,
    )


def _get(results, level, impl, T):
    for r in results:
        if r["level"] == level and r["impl"] == impl and r["T"] == T and "best_tok_s" in r:
            return r
    return None


def ratios(results: list[dict], args) -> list[dict]:
    """Throughput ratios against the targets (best over best, median over median)."""
    out = []
    levels = sorted({r["level"] for r in results}, key=("op", "layer").index)
    specs = [("infini-linear", "local-only", args.ratio_local_t, 0.85),
             ("infini-delta", "local-only", args.ratio_local_t, None),
             ("infini-linear", "full-causal", args.ratio_full_t, 5.0),
             ("infini-delta", "full-causal", args.ratio_full_t, None),
             ("seed-linear", "local-only", args.ratio_local_t, None),
             ("seed-linear", "local-only", args.ratio_full_t, None),
             ("infini-linear", "seed-linear", args.ratio_full_t, None)]
    mega = [("megalodon", "local-only", args.ratio_local_t, 0.6), ("megalodon", "local-only", args.ratio_full_t, 0.6),
            ("megalodon", "infini-linear", args.ratio_local_t, None)]
    for level in levels:
        for num, den, T, target in specs + (mega if level == "layer" and "megalodon" in args.impls else []):
            a, b = _get(results, level, num, T), _get(results, level, den, T)
            row = dict(level=level, ratio=f"{num} / {den}", T=T, target=target, best=None, median=None)
            if a and b:
                row["best"] = a["best_tok_s"] / b["best_tok_s"]
                row["median"] = a["median_tok_s"] / b["median_tok_s"]
                if b["runs"] == 1:
                    row["note"] = f"{den} measured once"
                if target is not None:
                    row["met"] = row["best"] >= target
            else:
                row["note"] = "not measured"
            out.append(row)
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _fmt_tok(x):
    return "-" if x is None else (f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}")


def _fmt_mib(x):
    return "-" if x is None else f"{x / MiB:.1f}"


def format_table(report: dict) -> str:
    c, e = report["config"], report["env"]
    lines = [
        f"one Infini attention {'/'.join(c['levels'])}, forward+backward: {c['device']} {c['dtype']} B={c['batch']} "
        f"H={c['heads']} G={c['kv_heads']} d={c['head_dim']} segment={c['segment']} rope={c['rope']} "
        f"threads={c['threads']} rounds={c['rounds']}",
        f"torch {e['torch']}; load avg before {_fmt_load(e['load_before'])}, after {_fmt_load(e['load_after'])}; "
        f"{e['elapsed_s']:.0f} s",
        "",
        f"{'level':<6} {'T':>6} {'impl':<14} {'best tok/s':>10} {'median':>8} {'runs':>4} "
        f"{'saved MiB':>9} {'peak MiB':>8}  note",
    ]
    for r in report["results"]:
        lines.append(
            f"{r['level']:<6} {r['T']:>6} {r['impl']:<14} {_fmt_tok(r.get('best_tok_s')):>10} "
            f"{_fmt_tok(r.get('median_tok_s')):>8} {r['runs']:>4} {_fmt_mib(r['saved_bytes']):>9} "
            f"{_fmt_mib(r['peak_bytes']):>8}  {r['note']}".rstrip())
    lines += ["", f"{'level':<6} {'ratio (throughput)':<30} {'T':>6} {'best':>6} {'median':>6}  target"]
    for r in report["ratios"]:
        tgt = "" if r["target"] is None else f">= {r['target']:g}: " + ("met" if r.get("met") else "MISSED")
        if r["best"] is None:
            tgt = (tgt.split(":")[0] + ": " if tgt else "") + "n/a"
        b = "-" if r["best"] is None else f"{r['best']:.2f}"
        m = "-" if r["median"] is None else f"{r['median']:.2f}"
        note = f" ({r['note']})" if r.get("note") else ""
        lines.append(f"{r['level']:<6} {r['ratio']:<30} {r['T']:>6} {b:>6} {m:>6}  {tgt}{note}")
    lines += ["", "saved MiB: unique storages saved for backward, parameters and inputs excluded (deterministic); "
              f"peak MiB: {c['peak_memory']}"]
    return "\n".join(lines)


def _fmt_load(load):
    avg = "n/a" if load["loadavg"] is None else " ".join(f"{x:.2f}" for x in load["loadavg"])
    pressure = load["cpu_pressure"]
    psi = "" if pressure is None else " (cpu pressure %s%%)" % "/".join(f"{x:.0f}" for x in pressure)
    return avg + psi


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--level", choices=("op", "layer", "both"), default="both")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "float64"))
    p.add_argument("--T", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="comma-separated sequence lengths (default 2048,8192,32768; --quick 2048,8192)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no GQA)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--segment", type=int, default=512)
    p.add_argument("--no-rope", action="store_true", help="leave RoPE out of the local/full attention paths")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5; --quick 2)")
    p.add_argument("--min-time", type=float, default=0.25, help="repeat fast cells to at least this many s per run")
    p.add_argument("--impls", type=lambda s: s.split(","), default=list(IMPLS))
    p.add_argument("--naive-max-t", type=int, default=2048)
    p.add_argument("--full-max-t", type=int, default=32768)
    p.add_argument("--full-budget", type=float, default=150.0,
                   help="skip full causal SDPA when one run is estimated to take longer (s)")
    p.add_argument("--once-above", type=float, default=20.0,
                   help="measure a cell only once when its warm-up run takes longer than this (s)")
    p.add_argument("--rss", action="store_true",
                   help="CPU: also measure the peak-RSS delta of one fwd+bwd per cell in a fresh process (slower)")
    p.add_argument("--rss-cell", default=None, help=argparse.SUPPRESS)
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="after timing, print the top ROWS ops (torch.profiler) of infini-linear and local-only at "
                        "--ratio-local-t")
    p.add_argument("--ratio-local-t", type=int, default=8192)
    p.add_argument("--ratio-full-t", type=int, default=32768)
    p.add_argument("--quick", action="store_true", help="smoke run: T up to 8K, 2 rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the full report here")
    args = p.parse_args(argv)
    if args.T is None:
        args.T = [2048, 8192] if args.quick else [2048, 8192, 32768]
    if args.rounds is None:
        args.rounds = 2 if args.quick else 5
    if args.kv_heads is None:
        args.kv_heads = args.heads
    bad = set(args.impls) - set(IMPLS)
    if bad:
        p.error(f"unknown --impls {sorted(bad)}; choose from {', '.join(IMPLS)}")
    return args


def main(argv=None) -> dict | None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.rss_cell:
        return _rss_child(args)
    report = run(args, [a for a in argv if a not in ("--rss",)])
    print(format_table(report), flush=True)
    for name, table in report["profiles"].items():
        print(f"\nprofile: {name}, 3 forward+backward steps\n{table}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
