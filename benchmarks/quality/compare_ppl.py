"""Compare two `infinitrain eval ppl` reports (memory on vs --no-memory): loss per segment index and the
token-weighted loss over segments >= --from-segment, printed as a table and optionally saved as JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def pooled(segments: list[dict], lo: int, hi: int | None = None) -> tuple[float, int]:
    """Token-weighted mean loss (nats/token) over segment indices lo <= k < hi, and the token count."""
    rows = [s for s in segments if s["segment"] >= lo and (hi is None or s["segment"] < hi) and s["tokens"]]
    tokens = sum(s["tokens"] for s in rows)
    return (sum(s["loss"] * s["tokens"] for s in rows) / tokens if tokens else float("nan")), tokens


def bins(n_segments: int, first: int) -> list[tuple[int, int | None]]:
    """Single indices below ``first``, then doubling ranges: [8, 16), [16, 32), ... and the open tail."""
    out: list[tuple[int, int | None]] = [(k, k + 1) for k in range(min(first, n_segments))]
    lo = first
    while lo < n_segments:
        out.append((lo, 2 * lo if 2 * lo < n_segments else None))
        lo *= 2
    return out


def compare(on: dict, off: dict, first: int) -> dict:
    n = max(s["segment"] for s in on["segments"]) + 1
    rows = []
    for lo, hi in bins(n, first):
        a, tokens = pooled(on["segments"], lo, hi)
        b, _ = pooled(off["segments"], lo, hi)
        rows.append({"segments": f"{lo}" if hi == lo + 1 else f"{lo}-{'' if hi is None else hi - 1}",
                     "tokens": tokens, "loss_memory": a, "loss_no_memory": b, "reduction": 1 - a / b})
    a, tokens = pooled(on["segments"], first)
    b, _ = pooled(off["segments"], first)
    return {"from_segment": first, "documents": on["documents"], "segment_len": on["segment_len"], "rows": rows,
            "tail": {"tokens": tokens, "loss_memory": a, "loss_no_memory": b, "reduction": 1 - a / b},
            "all": {"loss_memory": on["loss"], "loss_no_memory": off["loss"],
                    "reduction": 1 - on["loss"] / off["loss"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("memory", help="ppl.json (memory on)")
    ap.add_argument("no_memory", help="ppl-no-memory.json")
    ap.add_argument("--from-segment", type=int, default=8)
    ap.add_argument("--note", default="")
    ap.add_argument("--json", help="write the comparison here")
    args = ap.parse_args()
    on, off = (json.loads(Path(p).read_text()) for p in (args.memory, args.no_memory))
    if on["config"].get("memory") is False or off["config"].get("memory") is not False:
        raise SystemExit(f"error: expected {args.memory} with the memory on and {args.no_memory} with it off")
    res = {**compare(on, off, args.from_segment), "note": args.note}
    print(f"loss (nats/token) per segment index on {res['documents']} held-out documents, segment "
          f"{res['segment_len']} tokens{'; ' + args.note if args.note else ''}")
    print(f"{'segments':>10s} {'tokens':>9s} {'memory':>8s} {'no-memory':>10s} {'lower by':>9s}")
    for r in res["rows"]:
        print(f"{r['segments']:>10s} {r['tokens']:>9d} {r['loss_memory']:>8.4f} {r['loss_no_memory']:>10.4f} "
              f"{100 * r['reduction']:>8.1f}%")
    t = res["tail"]
    print(f"{'>= ' + str(args.from_segment):>10s} {t['tokens']:>9d} {t['loss_memory']:>8.4f} "
          f"{t['loss_no_memory']:>10.4f} "
          f"{100 * t['reduction']:>8.1f}%   (target: >= 3% lower with memory)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
