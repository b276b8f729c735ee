"""``python -m infinitrain.check`` (scripts/gpu_check.sh): what to run the first time a GPU is at hand, in under
10 minutes on one 80 GB GPU, printed as one short table.

1. parity: tests/test_device_parity.py on the device (INFINITRAIN_TEST_DEVICE), fp32 with TF32 off and bf16, at
   the tolerances that file states: ops against their float64 naive twins (outputs, states, gradients), streaming
   in chunks, the model token by token, generation (greedy, batched ragged, seeded sampling).
2. train: a 1b-shaped model (random init, bf16, ZeRO-3, one rank) trained ``--steps`` steps through the real
   trainer (``infinitrain train`` on generated text): tokens/s, MFU against the bf16 matmul peak measured in the
   same run, and peak torch.cuda.max_memory_allocated beside what ``infinitrain plan`` predicts for that config.
   The run ends with its checkpoint, as every run does (about 17 GB: bf16 weights, fp32 master and Adam states).
3. decode: ms per token of the 1b shape (bf16, batch 1) after 1K and 64K tokens of context (the state is constant,
   so the two should match; more than 2x apart fails).
4. generate: ``infinitrain generate --seed`` on the device twice (a small random model): the same text twice.
5. GQA: peak memory of one 8b-shaped attention call at 32K (bf16, forward and backward) with K/V handed to SDPA
   grouped and expanded per query head; the grouped path must take less.

Without CUDA it runs steps 1 and 4 on the CPU (the "CPU half", which CI runs), says so in one line and exits 0.
Exit code 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PARITY_TESTS = REPO / "tests" / "test_device_parity.py"


def run_parity(device: str, dtype: str) -> tuple[bool, str]:
    """tests/test_device_parity.py on ``device`` for one dtype: (passed, pytest's summary line)."""
    if not PARITY_TESTS.is_file():
        return False, f"{PARITY_TESTS} not found: run from a checkout of the repository (scripts/gpu_check.sh)"
    env = {**os.environ, "INFINITRAIN_TEST_DEVICE": device}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(PARITY_TESTS),
                          "-k", dtype], capture_output=True, text=True, env=env, cwd=REPO)
    lines = [x for x in (res.stdout + res.stderr).splitlines() if x.strip()]
    summary = lines[-1].strip("= ") if lines else f"pytest exited {res.returncode}"
    if res.returncode:
        sys.stderr.write(res.stdout[-4000:] + res.stderr[-2000:])
    return res.returncode == 0, str(summary)


def model_flops_per_token(model, segment_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 × non-embedding parameters, plus local attention (6·L·S·H·K:
    QKᵀ and AV over the causal half of each S×S block, times 3 for the backward) and the memory (12·L·H·K²)."""
    from infinitrain.model import count_parameters

    emb = model.vocab_size * model.d_model * (1 if model.tie_embeddings else 2)
    return (6 * (count_parameters(model) - emb) + 6 * model.n_layers * segment_len * model.n_heads * model.head_dim
            + 12 * model.n_layers * model.n_heads * model.head_dim ** 2)


def bf16_peak_flops() -> float:
    """Best of 10 timed 8192³ bf16 matmuls on the current CUDA device, in FLOP/s."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(10):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(5):
            a @ b
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / 5)
    return 2 * 8192 ** 3 / best


TRAIN_RECIPE = """\
# gpu_check: the 1b shape, random init, bf16, ZeRO-3 on one GPU, 4 segments of 2048 per sample
model: {{preset: 1b, segment_len: 2048}}
data: {{path: {data}, segments_per_sample: 4, micro_batch_size: {micro}, grad_accum: 1, val_samples: 1}}
schedule: {{steps: {steps}, warmup: 1}}
tbptt: {{window: 0, checkpointing: layer}}
checkpoint: {{save_every: 0, keep_last: 1}}
log: {{every: 1, eval_every: 0, tensorboard: false, progress: false}}
run: {{precision: bf16, zero_stage: 3, seed: 0}}
"""


def write_text(path: Path, n_bytes: int) -> None:
    rng = random.Random(0)
    words = ["memory", "segment", "the", "of", "a", "compressive", "attention", "long", "context", "token", "river",
             "stone", "winter", "light", "garden", "number", "seven", "north", "quiet", "answer"]
    out, size = [], 0
    while size < n_bytes:
        w = rng.choice(words) + (". " if rng.random() < 0.1 else " ")
        out.append(w)
        size += len(w)
    path.write_text("".join(out))


def check_train(work: Path, steps: int, micro: int) -> dict:
    """The 1b-shaped training run through ``infinitrain train``: tokens/s, MFU, peak memory vs the plan."""
    import torch

    from infinitrain.plan import plan
    from infinitrain.train.config import load_recipe

    text, recipe = work / "text.txt", work / "gpu-check-1b.yaml"
    write_text(text, 4_000_000)
    recipe.write_text(TRAIN_RECIPE.format(data=text, micro=micro, steps=steps))
    cfg = load_recipe(str(recipe))
    predicted = plan(cfg, gpus=1, gpu_memory=torch.cuda.get_device_properties(0).total_memory).peak
    peak = bf16_peak_flops()
    run_dir = work / "run-1b"
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "infinitrain.cli", "train", "--recipe", str(recipe), "--run-dir",
                          str(run_dir)], capture_output=True, text=True, cwd=work)
    seconds = time.perf_counter() - t
    if res.returncode:
        sys.stderr.write(res.stderr[-4000:])
        return {"ok": False, "error": f"infinitrain train exited {res.returncode}"}
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "tokens_per_s" in r]
    timed = rows[2:] or rows  # the first steps include allocation and kernel selection
    tok_s = statistics.median(r["tokens_per_s"] for r in timed)
    measured = max(r["peak_mem_mb"] for r in rows) * 2 ** 20
    flops = model_flops_per_token(cfg.model, cfg.model.segment_len)
    return {"ok": True, "tokens_per_s": tok_s, "mfu": tok_s * flops / peak, "bf16_peak_tflops": peak / 1e12,
            "peak_gb": measured / 1e9, "plan_gb": predicted / 1e9, "seconds": seconds,
            "tokens_per_step": cfg.sample_len * micro}


def decode_ms(model, context: int, steps: int = 64) -> float:
    """Milliseconds per decoded token (batch 1) after ``context`` random tokens prefilled in segments."""
    import torch

    from infinitrain.infer.generate import prefill

    S = model.config.segment_len
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, context), device="cuda", generator=g)
    state = prefill(model, (ids[:, a:a + S] for a in range(0, context, S)))
    token = ids[:, -1:]
    with torch.inference_mode():
        for _ in range(4):
            model(token, state)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            state = model(token, state).state
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps * 1e3


def check_decode() -> dict:
    import torch

    from infinitrain.model import InfiniLM, get_preset

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = InfiniLM(get_preset("1b")).to(torch.bfloat16).eval()
    short, long = decode_ms(model, 1024), decode_ms(model, 65536)
    del model
    torch.cuda.empty_cache()
    return {"ok": long < 2 * short, "ms_1k": short, "ms_64k": long}  # constant state: flat in the context


def check_gqa() -> dict:
    """Peak memory of one 8b-shaped Infini-attention call at 32K tokens (bf16, 32 query heads on 8 KV heads, forward
    and backward), K/V handed to SDPA grouped (FlashAttention reads them, ``grouped_sdpa``) and expanded per query
    head: the grouped path must take less."""
    import torch

    from infinitrain.ops import memory
    from infinitrain.ops.rope import RotarySpec

    def peak(grouped: bool) -> float:
        real = memory.grouped_sdpa
        memory.grouped_sdpa = (lambda q, masked: real(q, masked)) if grouped else (lambda q, masked: False)
        try:
            g = torch.Generator(device="cuda").manual_seed(0)
            q, k, v = (torch.randn(1, h, 32768, 128, device="cuda", dtype=torch.bfloat16, generator=g)
                       .requires_grad_(True) for h in (32, 8, 8))
            beta = torch.zeros(32, device="cuda", requires_grad=True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out, _ = memory.infini_attention(q, k, v, beta, segment_len=2048, rotary=RotarySpec(head_dim=128,
                                                                                               rot_dim=128))
            out.sum().backward()
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - base) / 1e9
        finally:
            memory.grouped_sdpa = real

    grouped, expanded = peak(True), peak(False)
    torch.cuda.empty_cache()
    return {"ok": grouped < expanded, "grouped_gb": grouped, "expanded_gb": expanded}


def check_generate(work: Path, device: str) -> dict:
    """``infinitrain generate --seed 7`` twice on the device with a small random model: the same text twice."""
    import torch

    from infinitrain.model import InfiniLM, get_preset

    torch.manual_seed(0)
    model_dir = work / "gen-model"
    InfiniLM(get_preset("debug")).save_pretrained(model_dir, extra={"tokenizer": "bytes"})
    cmd = [sys.executable, "-m", "infinitrain.cli", "generate", str(model_dir), "--prompt", "The memory of",
           "--seed", "7", "--temperature", "1.0", "--max-new-tokens", "48", "--device", device, "--no-stream"]
    outs = [subprocess.run(cmd, capture_output=True, text=True, cwd=work) for _ in range(2)]
    if any(o.returncode for o in outs):
        bad = next(o for o in outs if o.returncode)
        sys.stderr.write(bad.stderr[-3000:])
        return {"ok": False, "error": f"generate exited {bad.returncode}: {bad.stderr.strip().splitlines()[-1:]}"}
    return {"ok": outs[0].stdout == outs[1].stdout and bool(outs[0].stdout.strip()),
            "chars": len(outs[0].stdout)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=None, help="scratch directory, kept (default: a temporary one under ./runs, "
                    "removed at the end; the 1b run's final checkpoint needs about 20 GB there)")
    ap.add_argument("--steps", type=int, default=8, help="training steps of the 1b-shaped run")
    ap.add_argument("--micro-batch", type=int, default=2, help="samples of 8K tokens per step")
    a = ap.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    rows, ok = [], True
    for dtype in ("fp32", "bf16"):
        passed, summary = run_parity(device, dtype)
        ok &= passed
        rows.append((f"parity {dtype}" + (" (TF32 off)" if dtype == "fp32" else ""), passed, f"{device}: {summary}"))
    scratch = Path.cwd() / "runs"  # not /tmp: often a small tmpfs, and the 1b checkpoint is ~17 GB
    scratch.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch, prefix="gpu-check-") as tmp:
        work = Path(a.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        gen = check_generate(work, device)
        ok &= gen["ok"]
        rows.append((f"generate --seed on {device}", gen["ok"], gen.get("error") or "same text twice"))
        if not cuda:
            _table(rows)
            print("no CUDA device: ran the CPU half only (parity and generate on the CPU); the GPU checks need CUDA")
            return 0 if ok else 1
        tr = check_train(work, a.steps, a.micro_batch)
        ok &= tr["ok"]
        rows.append(("train 1b (ZeRO-3, bf16)", tr["ok"], tr.get("error") or (
            f"{tr['tokens_per_s']:,.0f} tok/s, MFU {tr['mfu']:.1%} of {tr['bf16_peak_tflops']:.0f} TFLOP/s measured; "
            f"peak {tr['peak_gb']:.1f} GB vs plan {tr['plan_gb']:.1f} GB ({tr['tokens_per_step']} tok/step, "
            f"{tr['seconds']:.0f} s)")))
        dec = check_decode()
        ok &= dec["ok"]
        rows.append(("decode 1b (bf16, batch 1)", dec["ok"],
                     f"{dec['ms_1k']:.2f} ms/token at 1K, {dec['ms_64k']:.2f} at 64K "
                     f"(x{dec['ms_64k'] / dec['ms_1k']:.2f})"))
        gqa = check_gqa()
        ok &= gqa["ok"]
        rows.append(("GQA 8b layer at 32K (bf16)", gqa["ok"], f"peak {gqa['grouped_gb']:.2f} GB with K/V grouped, "
                     f"{gqa['expanded_gb']:.2f} GB expanded per query head"))
        print(f"device: {torch.cuda.get_device_name(0)}")
        _table(rows)
    return 0 if ok else 1


def _table(rows) -> None:
    width = max(len(r[0]) for r in rows)
    for check, passed, detail in rows:
        print(f"{check:<{width}}  {'ok  ' if passed else 'FAIL'}  {detail}")


if __name__ == "__main__":
    sys.exit(main())
