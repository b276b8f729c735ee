"""Trainer throughput and memory: tokens/s, peak RSS and model FLOPs utilisation of TBPTT training steps of the
debug recipe (DeepSpeed ZeRO-3, one rank) at growing sample lengths with a fixed window W.

Reproduce (about 3 minutes on 2 cores):

    .venv/bin/python benchmarks/train.py                    # 4K, 16K, 64K tokens, W = 8 segments
    .venv/bin/python benchmarks/train.py --lengths 1024,4096 --steps 2 --json out.json

Each sample length runs in a fresh process (peak RSS is monotonic within a process): build the engine, one
warm-up step, then ``--steps`` timed steps of ``micro_batch`` random-token samples. Reported per length:
tokens/s, peak RSS (VmHWM), RSS after engine set-up and the growth in between, and MFU = model FLOP/s over the
fp32 matmul peak measured in the same process (a 1024³ matmul, best of 5). Model FLOPs per token: 6 × non-
embedding parameters (matmuls forward + backward) + 6 × layers × (S · D local attention, causal half of S² per
segment, QKᵀ and AV) + 12 × layers × H × K² (memory retrieval and update). The last table row is the ratio of
the longest to the shortest sample: the target is peak RSS growth under 10 % (memory is constant in N at fixed W).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def rss_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def matmul_peak(threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, (time.perf_counter() - t) / 4)
    return 2 * 1024**3 / best


def child(length: int, window: int, steps: int, micro: int, threads: int, ckpt: str) -> dict:
    import torch

    from infinitrain.check import model_flops_per_token
    from infinitrain.train.config import load_recipe
    from infinitrain.train.data import Batch
    from infinitrain.train.engine import build_engine, deepspeed_config, init_distributed, setup_environment
    from infinitrain.train.step import backward_windows

    torch.set_num_threads(threads)
    setup_environment()
    init_distributed()
    base = load_recipe("debug")
    S = base.model.segment_len
    cfg = load_recipe("debug", [f"data.segments_per_sample={length // S}", f"data.micro_batch_size={micro}",
                                f"tbptt.window={window}", f"tbptt.checkpointing={ckpt}"])
    engine, model = build_engine(cfg, deepspeed_config(cfg, 1))
    rss_init = rss_mb("VmRSS")
    g = torch.Generator().manual_seed(0)

    def step() -> None:
        ids = torch.randint(0, 256, (micro, length + 1), generator=g)
        doc = torch.zeros(micro, length, dtype=torch.bool)
        doc[:, 0] = True
        mb = Batch(ids[:, :-1], ids[:, 1:], torch.ones(micro, length, dtype=torch.bool), doc, torch.arange(micro))
        backward_windows(engine, [mb], segment_len=S, window=window, aux_weight=0.0)
        engine.step()

    step()  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        step()
    tok_s = steps * micro * length / (time.perf_counter() - t)
    flops_tok = model_flops_per_token(cfg.model, S)
    peak = matmul_peak(threads)
    return {"length": length, "segments": length // S, "window": window, "tokens_per_s": tok_s,
            "peak_rss_mb": rss_mb("VmHWM"), "rss_after_init_mb": rss_init, "mfu": tok_s * flops_tok / peak,
            "matmul_peak_gflops": peak / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="4096,16384,65536", help="sample lengths in tokens (multiples of S=64)")
    ap.add_argument("--window", type=int, default=8, help="W, segments per backward (fixed)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--micro", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (1 is steadier on a shared 2-core box)")
    ap.add_argument("--checkpointing", default="none", choices=["none", "layer", "segment"])
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        print("RESULT " + json.dumps(child(a.child, a.window, a.steps, a.micro, a.threads, a.checkpointing)))
        return
    rows = []
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = str(a.threads)
    for length in (int(x) for x in a.lengths.split(",")):
        res = subprocess.run([sys.executable, __file__, "--child", str(length), "--window", str(a.window),
                              "--steps", str(a.steps), "--micro", str(a.micro), "--threads", str(a.threads),
                              "--checkpointing", a.checkpointing], capture_output=True, text=True, env=env)
        line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
        if res.returncode or not line:
            sys.exit(f"length {length} failed:\n{res.stderr[-3000:]}")
        rows.append(json.loads(line[0][len("RESULT "):]))
    print(f"debug recipe, ZeRO-3 1 rank, W={a.window} segments, micro-batch {a.micro}, "
          f"checkpointing {a.checkpointing}, {a.threads} threads")
    print(f"{'tokens':>8} {'segments':>8} {'tok/s':>9} {'peak RSS MB':>12} {'RSS init MB':>12} {'growth MB':>10} "
          f"{'MFU':>7}")
    for r in rows:
        print(f"{r['length']:>8} {r['segments']:>8} {r['tokens_per_s']:>9.0f} {r['peak_rss_mb']:>12.0f} "
              f"{r['rss_after_init_mb']:>12.0f} {r['peak_rss_mb'] - r['rss_after_init_mb']:>10.0f} {r['mfu']:>7.2%}")
    lo, hi = rows[0], rows[-1]
    print(f"ratio {hi['length']}/{lo['length']}: peak RSS x{hi['peak_rss_mb'] / lo['peak_rss_mb']:.3f} "
          f"(target < 1.10), tok/s x{hi['tokens_per_s'] / lo['tokens_per_s']:.2f}; "
          f"matmul peak {lo['matmul_peak_gflops']:.1f} GFLOP/s")
    print("reproduce: .venv/bin/python benchmarks/train.py " + " ".join(sys.argv[1:]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
