"""Passkey accuracy of a trained model with every memory temperature τ multiplied by a factor at inference: is a
sharper memory read (diagnosed with memory_weights.py) what a longer context needs?

    python benchmarks/quality/tau_scale.py RUN_OR_EXPORT --tokenizer tokenizer.json --lengths 2k,32k --factors 1,2,3

A factor f scales both sides of the read and the write (σ(fτq), σ(fτk)); 'q2' scales the query side only. The
prompts are `infinitrain eval passkey`'s (same seeds), so factor 1 reproduces its table. Needs a model trained with
``model.memory_tau`` set.
"""

from __future__ import annotations

import argparse

import torch

import infinitrain.ops.memory as memory_ops
from infinitrain.infer.loading import load_for_inference
from infinitrain.evaluate.passkey import PasskeyConfig, parse_lengths, run_passkey
from infinitrain.model.lm import scale_memory_tau


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--lengths", default="2k,32k")
    ap.add_argument("--depths", default="0,25,50,75,100")
    ap.add_argument("--factors", default="1,2,3")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0,
                    help="the eval's prompt seed (0: its own prompts; others: other keys)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, codec = load_for_inference(args.model, tokenizer=args.tokenizer)
    taus = model.tau_parameters()
    if not taus:
        raise SystemExit(f"error: {args.model}: the model has no memory temperatures (model.memory_tau is null)")
    base = [p.detach().clone() for p in taus]
    depths = tuple(float(d) / 100 for d in args.depths.split(","))
    cfg = PasskeyConfig(lengths=tuple(parse_lengths(args.lengths)), depths=depths, samples=args.samples,
                        seed=args.seed, batch_size=10)
    query_tau = memory_ops.query_tau
    print(f"depths (%): {args.depths}")
    try:
        for spec in args.factors.split(","):
            query_only = spec.startswith("q")
            f = float(spec.lstrip("q"))
            with torch.no_grad():
                for p, b in zip(taus, base):
                    p.copy_(b)
            if not query_only:
                scale_memory_tau(model, f)  # what `eval --memory-tau-scale f` does
            memory_ops.query_tau = ((lambda tau, heads, f=f: query_tau(tau, heads) * f) if query_only
                                    else query_tau)
            grid = {(c["length"], c["depth"]): c["accuracy"] for c in run_passkey(model, codec, cfg,
                                                                                   progress=False).cells}
            for n in cfg.lengths:
                print(f"factor {spec:>4}  {n:>7} tokens: " + " ".join(f"{100 * grid[n, d]:4.0f}" for d in depths),
                      flush=True)
    finally:
        memory_ops.query_tau = query_tau


if __name__ == "__main__":
    main()
