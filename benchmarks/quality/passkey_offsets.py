"""Passkey accuracy by where the needle starts inside its segment: does a needle split by a segment boundary get lost?

`infinitrain eval passkey` draws its prompts like the paper's (fixed filler sentences, the needle after
round(n * depth) of them), so every prompt of a (length, depth) cell puts the needle at the same offset in its
segment. This script holds the length and (about) the depth and moves the needle across every offset the filler
allows: for each offset, the number of fillers before the needle nearest to ``--depth`` that lands the needle there,
then ``--samples`` prompts with keys uniform in 1..50000, answered greedily like the eval.
  python benchmarks/quality/passkey_offsets.py RUN --tokenizer tokenizer.json --length 32768 --depth 0.25
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from infinitrain.data_tools.passkey import FILLER, QUESTION, TASK, build_context, needle
from infinitrain.infer.loading import load_for_inference
from infinitrain.evaluate.passkey import first_integer
from infinitrain.infer.generate import Sampling, generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--length", type=int, default=32768, help="prompt tokens (at most)")
    ap.add_argument("--depth", type=float, default=0.25)
    ap.add_argument("--samples", type=int, default=30, help="prompts per offset")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the table here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, codec = load_for_inference(args.run, tokenizer=args.tokenizer)
    S = model.config.segment_len

    def n_tokens(text: str) -> int:
        return len(codec.tokenizer.encode(text, add_special_tokens=False).ids)

    task, per = n_tokens(TASK), n_tokens(FILLER)  # pieces start at a pre-token boundary: their counts add up
    rng, rows = random.Random(args.seed), []
    print(f"{args.run}: length {args.length}, depth ~{args.depth}, {args.samples} prompts an offset, segment {S}")
    print("offset  first digit (>= segment: in the next one)  depth  correct")
    for offset in sorted({(task + b * per) % S for b in range(S)}):
        prompts, keys = [], []
        for _ in range(args.samples):
            key = rng.randint(1, 50000)
            n = (args.length - n_tokens(TASK + needle(key) + QUESTION + f" {key}.")) // per
            target = round(n * args.depth)
            before = min((b for b in range(n + 1) if (task + b * per) % S == offset), key=lambda b: abs(b - target))
            prompts.append(codec.encode(build_context(key, n, before / n) + QUESTION))
            keys.append(key)
        outs = generate(model, prompts, Sampling(max_new_tokens=10, temperature=0.0, eos_id=codec.eos_id))
        correct = sum(first_integer(codec.decode(o)) == k for o, k in zip(outs, keys))
        digit = offset + n_tokens(needle(1).split(" 1.")[0])  # where the key's first digit lands
        rows.append({"offset": offset, "first_digit": digit, "depth": before / n, "correct": correct,
                     "total": len(keys), "tokens_max": max(map(len, prompts))})
        print(f"{offset:6d}  {digit:42d}  {before / n:5.2f}  {correct}/{len(keys)}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"run": args.run, "length": args.length, "depth": args.depth, "segment_len": S, "rows": rows},
                      f, indent=1)


if __name__ == "__main__":
    main()
