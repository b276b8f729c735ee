"""Per-token decode latency and peak memory of `generate` at 1K..1M tokens of context, vs a full-attention KV-cache
decoder.

Reproduce (about 5 minutes on 2 loaded CPU cores; ``--quick`` is a smoke run):

    .venv/bin/python benchmarks/generate.py --json out.json

Three implementations, the same dims:

* ``infini``: a tiny InfiniLM (default d 256, 2 layers, 4 heads x 64, FFN 512, vocab 256, segment 512) is
  prefilled with C-1 random tokens streamed one segment at a time through ``infinitrain.infer.generate.prefill`` (the
  prompt never exists as a whole, only the state is kept), then ``generate(..., state=)`` decodes
  ``--decode-tokens`` tokens greedily (default one segment: every in-segment position and one compression into
  the memory are in the median); a token's latency is the time between two ``on_tokens`` callbacks. All C are
  multiples of the segment, so decoding starts at the same in-segment position at every C.
* ``megalodon``: a MEGALODON model of the same D, layers, heads (Z = D/H per head, values D, 16 CEMA dims, chunk
  = segment), prefilled and decoded exactly as ``infini``: its state is the CEMA state, the timestep-norm
  statistics and the unfinished chunk's keys/values, so its per-token cost is flat in the context too
  (``--archs infini`` leaves it out).
* ``full-attn``: the same weights run as a plain causal decoder (RoPE, one KV cache per layer preallocated to
  C + decode tokens, gpt-fast style); ``--check`` proves it equals the InfiniLM with one segment covering the
  whole sequence and the memory gates closed. Its cache is filled with random keys/values instead of a real
  prefill (a step's cost depends on the cache length, not on its values), so 64K costs no O(C²) prefill.

Latency (contexts 1K..256K): one process prefills every infini state once (a few hundred KiB each, whatever C),
then ``--rounds`` rounds time every (impl, C) cell in a fresh random order from the same start; each step keeps
its fastest round (load bursts on a shared machine must then hit one step in every round), and the median over
steps is reported (the raw median of all timings is in the JSON).
The `generate --prompt-file` row: the CLI as a user runs it on files of 33 KB and 3.96 MB (the debug preset; the file
is read, tokenized and prefilled in pieces), peak RSS of each fresh process; ``--prompt-files-only`` runs only it.
Peak memory (prompts of 1K and 1M tokens, and the full-attention cache at 64K): one fresh process per cell that
prefills and decodes 16 tokens. Reported: the child's ``VmHWM`` (peak RSS of the process image, from
/proc/self/status) and its growth over the RSS once the model is built. Not ``getrusage().ru_maxrss``: Linux
carries the forking parent's RSS into the child's ru_maxrss across fork+exec, so every child would report at
least this (large) parent's RSS.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from infinitrain.infer.generate import Sampling, generate, prefill
from infinitrain.model import InfiniLM, ModelConfig
from infinitrain.ops.memory import _expand_kv
from infinitrain.ops.rope import rope_angles, rotate

MiB = 2.0 ** 20
K = 1024
FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "pride_and_prejudice_ch1-12.txt"


def model_config(args, segment_len: int | None = None, arch: str = "infini") -> ModelConfig:
    if arch == "megalodon":
        return ModelConfig(arch="megalodon", vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers,
                           n_heads=args.heads, head_dim=args.d_model // args.heads, v_dim=args.d_model, d_ff=args.d_ff,
                           ema_dim=16, norm_groups=math.gcd(32, args.d_model), segment_len=segment_len or args.segment)
    return ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                       d_ff=args.d_ff, segment_len=segment_len or args.segment)


def build(args, segment_len: int | None = None, arch: str = "infini") -> InfiniLM:
    torch.manual_seed(0)
    model = InfiniLM(model_config(args, segment_len, arch)).eval()
    with torch.no_grad():
        for p in model.gate_parameters():
            p.fill_(1.0)  # open gates: the memory path is live
    return model


class KVCacheDecoder:
    """A plain causal decoder over an InfiniLM's weights (MoD-free): full attention with a preallocated KV cache.

    ``step(ids (B, T), pos)`` appends T tokens at stream positions pos..pos+T-1 and returns their logits.
    """

    def __init__(self, lm: InfiniLM, max_len: int, batch: int = 1):
        self.lm = lm
        c = lm.config
        shape = (batch, c.n_kv_heads, max_len, c.head_dim)
        self.k = [torch.zeros(shape) for _ in lm.layers]  # (B, G, L, K) rotated keys
        self.v = [torch.zeros(shape) for _ in lm.layers]

    def fill_random(self, n: int, generator: torch.Generator) -> None:
        """Stand-in for a prefill of n tokens (the decode cost depends on the cache length only)."""
        for k, v in zip(self.k, self.v):
            k[:, :, :n].normal_(generator=generator)
            v[:, :, :n].normal_(generator=generator)

    @torch.no_grad()
    def step(self, ids: Tensor, pos: int) -> Tensor:
        lm, T = self.lm, ids.shape[1]
        x = lm.embed(ids)  # (B, T, D)
        positions = torch.arange(pos, pos + T)
        spec = lm.layers[0].attn.rotary
        if spec is not None:  # cos/sin of these positions once per step for every layer (as Hugging Face does)
            cos, sin = rope_angles(positions, spec, torch.promote_types(x.dtype, torch.float32))
        for layer, kc, vc in zip(lm.layers, self.k, self.v):
            attn = layer.attn
            q, k, v = attn.project(layer.attn_norm(x))  # (B, H, T, K), (B, G, T, K)
            if spec is not None:
                q, k = rotate(q, cos, sin, spec), rotate(k, cos, sin, spec)
            kc[:, :, pos:pos + T], vc[:, :, pos:pos + T] = k, v
            keys, values = _expand_kv(kc[:, :, :pos + T], attn.n_heads), _expand_kv(vc[:, :, :pos + T], attn.n_heads)
            mask = torch.arange(pos + T)[None, :] <= positions[:, None] if T > 1 else None  # (T, pos+T)
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            x = layer._mlp(x + attn.merge(o))
        return lm.lm_head(lm.norm(x))


def check_baseline(args) -> float:
    """Max |logit difference| between the KV-cache decoder (prefill 24 then 16 single steps) and an InfiniLM
    whose one segment covers the sequence with the memory gates closed (plain causal attention)."""
    lm = build(args, segment_len=64)
    with torch.no_grad():
        for p in lm.gate_parameters():
            p.fill_(float("-inf"))
    ids = torch.randint(0, args.vocab, (1, 40), generator=torch.Generator().manual_seed(1))
    dec = KVCacheDecoder(lm, 40)
    got = [dec.step(ids[:, :24], 0)] + [dec.step(ids[:, t:t + 1], t) for t in range(24, 40)]
    with torch.no_grad():
        ref = lm(ids).logits
    return float((torch.cat(got, 1) - ref).abs().max())


def _proc_mib(name: str) -> float:
    """VmHWM (peak RSS of this process image) or VmRSS from /proc/self/status, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024 / MiB
    raise OSError(f"{name} not in /proc/self/status")


def prefill_random(model: InfiniLM, context: int, args):
    """State after C-1 random tokens streamed one segment at a time (the prompt never exists as a whole),
    the last prompt token, and the prefill time."""
    S, V = args.segment, args.vocab
    gen = torch.Generator().manual_seed(context)
    n = context - 1
    chunks = (torch.randint(0, V, (1, min(S, n - i)), generator=gen) for i in range(0, n, S))
    t0 = time.perf_counter()
    state = prefill(model, chunks)
    return state, int(torch.randint(0, V, (1,), generator=gen)), time.perf_counter() - t0


def decode_infini(model: InfiniLM, state, last: int, n: int) -> list[float]:
    """Latencies of n greedy decode steps of ``generate`` from a prefilled state (the state is not modified)."""
    stamps: list[float] = []
    generate(model, [[last]], Sampling(max_new_tokens=n + 1, temperature=0), state=state,
             on_tokens=lambda ids, active: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps, stamps[1:])]


def decode_full(dec: KVCacheDecoder, context: int, n: int) -> list[float]:
    token = torch.zeros(1, 1, dtype=torch.long)
    lat = []
    for i in range(n + 1):
        t = time.perf_counter()
        token = dec.step(token, context + i)[:, -1].argmax(-1, keepdim=True)
        lat.append(time.perf_counter() - t)
    return lat[1:]


def measure_latency(args) -> list[dict]:
    """Per-token decode latency of every (impl, context), in one process: the infini states are prefilled once
    (each is a few hundred KiB, whatever the context), then ``--rounds`` rounds time every cell in a fresh random
    order from the same start, so every round replays the same steps. A step's latency is its minimum over the
    rounds (another process's burst must hit that step in every round to count); reported: the median over
    steps of these minima (and p90), beside the raw median of every timing."""
    cells: dict[tuple[str, int], dict] = {}
    for arch in args.archs:
        model = build(args, arch=arch)
        for c in args.contexts:
            state, last, secs = prefill_random(model, c, args)
            cells[arch, c] = {"impl": arch, "context": c, "prefill_s": secs, "prefill_tok_s": (c - 1) / secs,
                              "run": lambda m=model, st=state, la=last: decode_infini(m, st, la, args.decode_tokens)}
            _log(f"{arch}: prefilled {_label(c)} in {secs:.1f} s")
    for c in args.full_contexts:
        dec = KVCacheDecoder(build(args), c + args.full_decode_tokens + 1)
        dec.fill_random(c, torch.Generator().manual_seed(c))
        cells["full-attn", c] = {"impl": "full-attn", "context": c,
                                 "run": lambda d=dec, c=c: decode_full(d, c, args.full_decode_tokens)}
    rounds: dict[tuple[str, int], list[list[float]]] = {k: [] for k in cells}
    order = list(cells)
    rng = random.Random(0)
    for r in range(args.rounds):
        rng.shuffle(order)
        for key in order:
            rounds[key].append(cells[key]["run"]())
        _log(f"round {r + 1}/{args.rounds} done")
    out = []
    for key, cell in cells.items():
        per_step = [min(steps) for steps in zip(*rounds[key])]  # step i's best over the rounds
        lat = sorted(per_step)
        out.append({k: v for k, v in cell.items() if k != "run"} | {
            "decode_ms_median": 1e3 * statistics.median(per_step),
            "decode_ms_p90": 1e3 * lat[int(0.9 * (len(lat) - 1))],
            "decode_ms_raw_median": 1e3 * statistics.median([x for r in rounds[key] for x in r]),
            "decode_ms_round_medians": [1e3 * statistics.median(r) for r in rounds[key]], "decode_tokens": len(lat)})
    return out


def peak_rss(args, impl: str, context: int) -> dict:
    """Child process body: prefill (or fill the cache) to ``context``, decode a few tokens, report ru_maxrss."""
    model = build(args, arch="infini" if impl == "full-attn" else impl)
    base = _proc_mib("VmRSS")
    t0 = time.perf_counter()
    if impl != "full-attn":
        state, last, _ = prefill_random(model, context, args)
        decode_infini(model, state, last, 16)
    else:
        dec = KVCacheDecoder(model, context + 17)
        dec.fill_random(context, torch.Generator().manual_seed(context))
        decode_full(dec, context, 16)
    peak = _proc_mib("VmHWM")
    return {"impl": impl, "context": context, "peak_rss_mib": peak, "growth_mib": peak - base,
            "seconds": time.perf_counter() - t0}


PROMPT_CHILD = """
import sys
from infinitrain.cli import main
try:
    main()
finally:
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
    print(f"VmHWM_KIB {hwm}", file=sys.stderr)
"""


def prompt_file_rss(args, work: Path) -> list[dict]:
    """`infinitrain generate MODEL --prompt-file FILE` as a user runs it, one fresh process per file size: the
    debug preset (random weights) with a BPE of vocab 512 trained on the test fixture, prompts made of that text
    repeated (``--prompt-file-kb``). Reported: the process's VmHWM, the prompt's tokens, the wall time."""
    from infinitrain.data_tools.tokenizer import save_tokenizer, train_bpe
    from infinitrain.model.config import get_preset

    text = FIXTURE.read_text()
    save_tokenizer(train_bpe([text], vocab_size=512), work / "tokenizer.json")
    torch.manual_seed(0)
    InfiniLM(get_preset("debug")).save_pretrained(work / "model")
    (work / "model" / "tokenizer.json").write_bytes((work / "tokenizer.json").read_bytes())
    out = []
    for kb in args.prompt_file_kb:
        size = int(kb * 1000)
        prompt = work / f"prompt-{kb:g}kb.txt"
        prompt.write_text((text * (size // len(text.encode()) + 1)).encode()[:size].decode("utf-8", "ignore"))
        cmd = [sys.executable, "-c", PROMPT_CHILD, "generate", str(work / "model"), "--prompt-file", str(prompt),
               "--max-new-tokens", "16", "--temperature", "0", "--no-progress", "--no-stream",
               "--threads", str(args.threads)]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
        if res.returncode != 0:
            raise RuntimeError(f"generate --prompt-file {prompt} failed:\n{res.stderr[-2000:]}")
        hwm = int(res.stderr.strip().splitlines()[-1].split()[1])
        tokens = int(re.search(r"prefill ([\d,]+) tokens", res.stderr).group(1).replace(",", ""))
        out.append({"prompt_bytes": prompt.stat().st_size, "prompt_tokens": tokens, "peak_rss_mib": hwm / 1024,
                    "seconds": time.perf_counter() - t0})
        _log(f"generate --prompt-file {prompt.stat().st_size:,} bytes ({tokens:,} tokens): peak RSS "
             f"{hwm / 1024:.0f} MiB ({out[-1]['seconds']:.0f} s)")
    return out


def format_prompt_files(rows: list[dict]) -> str:
    lo, hi = rows[0], rows[-1]
    cells = ",  ".join(f"{r['prompt_bytes'] / 1e6:.3g} MB ({r['prompt_tokens']:,} tokens): {r['peak_rss_mib']:.0f} MiB"
                       for r in rows)
    return (f"generate --prompt-file peak RSS (fresh CLI process, debug preset): {cells}\n"
            f"peak RSS {hi['prompt_bytes'] / 1e6:.3g} MB / {lo['prompt_bytes'] / 1e6:.3g} MB prompt file: "
            f"{hi['peak_rss_mib'] / lo['peak_rss_mib']:.3f}x (target <= 1.15x)")


def rss_child(args, impl: str, context: int, argv: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", f"{impl}:{context}"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"child {impl}:{context} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def run(args, argv: list[str]) -> dict:
    torch.set_num_threads(args.threads)
    report = {"command": "python benchmarks/generate.py " + " ".join(argv), "torch": torch.__version__,
              "machine": f"{platform.machine()} {os.cpu_count()} cpus", "threads": args.threads,
              "load_start": _load(), "config": model_config(args).to_dict(), "contexts": args.contexts,
              "decode_tokens": args.decode_tokens, "full_decode_tokens": args.full_decode_tokens, "rounds": args.rounds}
    if args.check:
        report["baseline_max_abs_diff"] = check_baseline(args)
    report["results"] = measure_latency(args)
    report["memory"] = []
    for impl, c in [(a, c) for a in args.archs for c in args.rss_contexts] + [("full-attn", max(args.full_contexts))]:
        r = rss_child(args, impl, c, argv)
        report["memory"].append(r)
        _log(f"{impl} {_label(c)}: peak RSS {r['peak_rss_mib']:.0f} MiB ({r['seconds']:.0f} s)")
    with tempfile.TemporaryDirectory() as work:
        report["prompt_files"] = prompt_file_rss(args, Path(work))
    report["load_end"] = _load()
    report["summary"] = summarize(report, args)
    return report


def summarize(report: dict, args) -> dict:
    inf = {r["context"]: r for r in report["results"] if r["impl"] == "infini"}
    full = {r["context"]: r for r in report["results"] if r["impl"] == "full-attn"}
    mem = {r["context"]: r for r in report["memory"] if r["impl"] == "infini"}
    spread = [inf[c]["decode_ms_median"] for c in args.contexts]
    out = {"latency_spread": max(spread) / min(spread) - 1}  # target <= 0.10
    lo, hi = min(mem), max(mem)
    out["rss_contexts"] = [lo, hi]
    out["rss_ratio"] = mem[hi]["peak_rss_mib"] / mem[lo]["peak_rss_mib"]  # target 1.0
    both = sorted(set(inf) & set(full))
    if both:
        c = args.ratio_at if args.ratio_at in both else both[-1]
        out["ratio_context"] = c
        out["full_over_infini"] = full[c]["decode_ms_median"] / inf[c]["decode_ms_median"]  # target >= 10
    mega = {r["context"]: r for r in report["results"] if r["impl"] == "megalodon"}
    mega_mem = {r["context"]: r for r in report["memory"] if r["impl"] == "megalodon"}
    if mega:
        lat = [mega[c]["decode_ms_median"] for c in args.contexts]
        out["megalodon_latency_spread"] = max(lat) / min(lat) - 1
        out["megalodon_rss_ratio"] = mega_mem[hi]["peak_rss_mib"] / mega_mem[lo]["peak_rss_mib"]
        out["megalodon_over_infini"] = statistics.median(mega[c]["decode_ms_median"] / inf[c]["decode_ms_median"]
                                                         for c in args.contexts)
    return out


def _label(n: int) -> str:
    return f"{n // (K * K)}M" if n % (K * K) == 0 else f"{n // K}K" if n % K == 0 else str(n)


def format_table(report: dict) -> str:
    full = {r["context"]: r for r in report["results"] if r["impl"] == "full-attn"}
    mega = {r["context"]: r for r in report["results"] if r["impl"] == "megalodon"}
    lines = [f"{'context':>8s} {'prefill s':>10s} {'prefill tok/s':>14s} {'ms/token':>9s} {'p90':>7s} | "
             f"{'full-attn ms/token':>18s} {'full/infini':>11s} | {'megalodon ms/token':>18s} {'prefill tok/s':>14s}"]
    for r in (r for r in report["results"] if r["impl"] == "infini"):
        f, m = full.get(r["context"]), mega.get(r["context"])
        tail = f"{f['decode_ms_median']:>18.3f} {f['decode_ms_median'] / r['decode_ms_median']:>10.1f}x" if f \
            else f"{'-':>18s} {'-':>11s}"
        tail += f" | {m['decode_ms_median']:>18.3f} {m['prefill_tok_s']:>14,.0f}" if m else f" | {'-':>18s} {'-':>14s}"
        lines.append(f"{_label(r['context']):>8s} {r['prefill_s']:>10.1f} {r['prefill_tok_s']:>14,.0f} "
                     f"{r['decode_ms_median']:>9.3f} {r['decode_ms_p90']:>7.3f} | {tail}")
    lines.append("")
    lines.append("peak RSS (fresh process; in brackets the growth over the RSS after building the model):")
    lines.append("   " + ",  ".join(f"{r['impl']} {_label(r['context'])}: {r['peak_rss_mib']:.1f} MiB "
                                   f"(+{r['growth_mib']:.1f})" for r in report["memory"]))
    s = report["summary"]
    ctx = report["contexts"]
    lines.append(f"decode latency spread {_label(min(ctx))}..{_label(max(ctx))}: {100 * s['latency_spread']:.1f}% "
                 f"(max/min of medians - 1; target <= 10%)")
    lo, hi = s["rss_contexts"]
    lines.append(f"peak RSS {_label(hi)} / {_label(lo)} prompt: {s['rss_ratio']:.3f}x (target 1.0x: constant memory)")
    if "megalodon_latency_spread" in s:
        lines.append(f"megalodon: decode latency spread {100 * s['megalodon_latency_spread']:.1f}%, peak RSS "
                     f"{_label(hi)} / {_label(lo)} prompt {s['megalodon_rss_ratio']:.3f}x, ms/token "
                     f"{s['megalodon_over_infini']:.2f}x infini's (median over contexts)")
    if "full_over_infini" in s:
        lines.append(f"full-attention KV-cache decoder / infini at {_label(s['ratio_context'])}: "
                     f"{s['full_over_infini']:.1f}x slower per token (target >= 10x)")
    if "baseline_max_abs_diff" in report:
        lines.append(f"baseline check: KV-cache decoder vs one-segment InfiniLM with closed gates, max |dlogit| = "
                     f"{report['baseline_max_abs_diff']:.2e}")
    lines.append(f"ms/token: median over {report['decode_tokens']} infini / {report['full_decode_tokens']} full-attn "
                 f"decode steps of each step's fastest of {report['rounds']} interleaved rounds")
    lines.append(f"machine {report['machine']}, {report['threads']} torch thread(s), torch {report['torch']}, "
                 f"load average {report['load_start']} -> {report['load_end']}")
    if report.get("prompt_files"):
        lines.append(format_prompt_files(report["prompt_files"]))
    lines.append(f"reproduce: {report['command']}")
    return "\n".join(lines)


def _ints(s: str) -> list[int]:
    out = []
    for x in s.split(","):
        x = x.strip().lower()
        mult = K * K if x.endswith("m") else K if x.endswith("k") else 1
        out.append(int(x.rstrip("km")) * mult)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=_ints, default=None, help="infini latency contexts (default 1k,4k,16k,64k,256k)")
    p.add_argument("--full-contexts", type=_ints, default=None, help="full-attention contexts (default 1k,16k,64k)")
    p.add_argument("--rss-contexts", type=_ints, default=None, help="infini peak-RSS prompts (default 1k,1m)")
    p.add_argument("--ratio-at", type=_ints, default=None, help="context of the full/infini ratio (64k)")
    p.add_argument("--decode-tokens", type=int, default=None,
                   help="timed infini decode steps per cell and round (default: one segment, so every in-segment "
                        "position and one compression into the memory are in the median)")
    p.add_argument("--full-decode-tokens", type=int, default=None,
                   help="timed full-attention decode steps (default 64: the cache barely grows over them)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved timing rounds; each step keeps its fastest (default 10, --quick 1)")
    p.add_argument("--segment", type=int, default=512)
    p.add_argument("--archs", type=lambda s: s.split(","), default=["infini", "megalodon"],
                   help="model families timed beside the full-attention decoder (infini first)")
    p.add_argument("--d-model", type=int, default=256, help="with --heads 4: head dim 64, as the 1b preset")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=512)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared 2-core box)")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="verify the full-attention baseline against the InfiniLM first")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny contexts and sizes")
    p.add_argument("--prompt-file-kb", type=lambda t: [float(x) for x in t.split(",")], default=None,
                   help="sizes of the `generate --prompt-file` RSS row in KB (default 33,3960; --quick 4,40)")
    p.add_argument("--prompt-files-only", action="store_true", help="measure only the --prompt-file RSS row")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.segment = 64 if args.segment == 512 else args.segment
        args.contexts = args.contexts or [128, 256]
        args.full_contexts = args.full_contexts or [256]
        args.rss_contexts = args.rss_contexts or [64, 256]
        args.decode_tokens = args.decode_tokens or 8
        args.full_decode_tokens = args.full_decode_tokens or 8
    args.prompt_file_kb = args.prompt_file_kb or ([4, 40] if args.quick else [33, 3960])
    args.rounds = args.rounds or (1 if args.quick else 10)  # 10: a load burst must hit a step in all of them
    args.contexts = sorted(args.contexts or _ints("1k,4k,16k,64k,256k"))
    args.full_contexts = sorted(args.full_contexts or _ints("1k,16k,64k"))
    args.rss_contexts = sorted(args.rss_contexts or _ints("1k,1m"))
    args.ratio_at = (args.ratio_at or [64 * K])[0]
    args.decode_tokens = args.decode_tokens or args.segment
    args.full_decode_tokens = args.full_decode_tokens or 64
    bad = [c for c in args.contexts + args.rss_contexts if c % args.segment or c < args.segment]
    if bad:
        p.error(f"contexts must be multiples of --segment {args.segment} (same in-segment decode start): {bad}")
    return args


def main(argv: list[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        torch.set_num_threads(args.threads)
        impl, context = args.child.split(":")
        print(json.dumps(peak_rss(args, impl, int(context))))
        return None
    if args.prompt_files_only:
        with tempfile.TemporaryDirectory() as work:
            report = {"command": "python benchmarks/generate.py " + " ".join(argv), "load_start": _load(),
                      "prompt_files": prompt_file_rss(args, Path(work)), "load_end": _load()}
        print(format_prompt_files(report["prompt_files"]))
        print(f"load average {report['load_start']} -> {report['load_end']}; reproduce: {report['command']}")
    else:
        report = run(args, argv)
        print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
