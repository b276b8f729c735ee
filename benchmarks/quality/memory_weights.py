"""How selective is a trained model's memory read? For a passkey prompt with the needle in the first segments, the
share of each head's memory-read weight (Eq. 7: sigma(q) . sigma(k_i), normalised over the stored tokens) that falls
on the needle's tokens, against their share of the stored tokens (what a uniform read would give).

    python benchmarks/quality/memory_weights.py RUN_OR_EXPORT --tokenizer tokenizer.json --lengths 256,2k,8k

A ratio near 1 means the read is a plain average of the past: the key cannot come back through the memory however
well the model copies locally. Queries are the answer's tokens (the model is fed the right answer, teacher-forced).
"""

from __future__ import annotations

import argparse

import torch

from infinitrain.data_tools.passkey import needle, passkey_records
from infinitrain.evaluate.passkey import parse_lengths
from infinitrain.infer.loading import load_for_inference
from infinitrain.ops.memory import query_tau, sigma


def capture_qk(model, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Per layer, the un-rotated q (H, T, K) and k (G, T, K) of one sequence, padded to whole segments, and the
    layer's memory temperatures τ (G,) (None: the paper's σ)."""
    S = model.config.segment_len
    x = torch.tensor([ids + [0] * (-len(ids) % S)])
    out, hooks = [], []
    for block in model.layers:
        attn, got = block.attn, {}
        hooks.append(attn.q_proj.register_forward_hook(lambda m, i, o, got=got: got.__setitem__("q", o)))
        hooks.append(attn.k_proj.register_forward_hook(lambda m, i, o, got=got: got.__setitem__("k", o)))
        out.append((attn, got))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    T = x.shape[1]
    return [(got["q"][0].view(T, a.n_heads, a.head_dim).transpose(0, 1),
             got["k"][0].view(T, a.n_kv_heads, a.head_dim).transpose(0, 1), a.tau()) for a, got in out]


def needle_share(model, tok, length: int) -> dict:
    rec = passkey_records(tok, length=length, depths=[0.0], count=1)[0]  # the eval's prompt, needle first
    prompt, nd = rec["prompt"], needle(rec["pass_key"])
    ids = tok.encode(rec["text"], add_special_tokens=False).ids
    start = len(tok.encode(prompt[:prompt.index(nd)], add_special_tokens=False).ids)
    stop = len(tok.encode(prompt[:prompt.index(nd) + len(nd)], add_special_tokens=False).ids)
    S = model.config.segment_len
    first_answer = len(tok.encode(prompt, add_special_tokens=False).ids)
    stored = first_answer // S * S  # tokens in memory when the answer is read (earlier segments)
    if stop > stored:
        raise SystemExit(f"--lengths {length}: the needle is not yet in memory at the answer (segment {S})")
    uniform = (stop - start) / stored
    rows = []
    for li, (q, k, tau) in enumerate(capture_qk(model, ids)):
        group = q.shape[0] // k.shape[0]
        # the op's own σ (with the layer's temperatures), in fp64: heads on dim 1 as the op expects
        sq = sigma(q[None, :, first_answer - 1:len(ids) - 1].double(), query_tau(tau, q.shape[0]))[0]
        sk = sigma(k[None, :, :stored].double(), tau)[0]
        for h in range(q.shape[0]):
            w = sq[h] @ sk[h // group].T
            w = w / w.sum(-1, keepdim=True)
            share = w[:, start:stop].sum(-1).mean().item()
            rows.append({"layer": li, "head": h, "needle_share": share, "ratio": share / uniform})
    return {"length": len(ids), "stored": stored, "needle_tokens": stop - start, "uniform_share": uniform,
            "heads": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--lengths", default="256,2k,8k")
    args = ap.parse_args()
    model, codec = load_for_inference(args.model, tokenizer=args.tokenizer)
    for length in parse_lengths(args.lengths):
        res = needle_share(model, codec.tokenizer, length)
        print(f"{res['length']:>7} tokens, {res['stored']} in memory, needle {res['needle_tokens']} tokens "
              f"(uniform share {res['uniform_share']:.4f}):  " +
              "  ".join(f"L{r['layer']}h{r['head']} {r['needle_share']:.4f} (x{r['ratio']:.1f})" for r in res["heads"]))


if __name__ == "__main__":
    main()
