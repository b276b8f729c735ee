"""Turn `infinitrain data passkey` records into `prepare --format summarization` records: the loss is on the
"summary" part only. --loss answer: only the answer (" 12345." + eos); --loss after: everything after the first
occurrence of the key in the needle (its second occurrence, the filler after it, the question and the answer),
so the unpredictable first occurrence of the key is never a target."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def split(record: dict, loss: str) -> dict:
    if loss == "answer":
        return {"document": record["prompt"], "summary": record["answer"]}
    text, first = record["text"], f" The pass key is {record['pass_key']}"
    cut = text.index(first) + len(first)
    return {"document": text[:cut], "summary": text[cut:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("inputs", nargs="+", help="passkey JSONL files")
    ap.add_argument("--out", required=True)
    ap.add_argument("--loss", choices=("answer", "after"), default="after")
    args = ap.parse_args()
    n = 0
    with open(args.out, "w") as out:
        for path in args.inputs:
            for line in Path(path).read_text().splitlines():
                out.write(json.dumps(split(json.loads(line), args.loss)) + "\n")
                n += 1
    print(f"wrote {args.out}: {n} records (loss on the {args.loss})")


if __name__ == "__main__":
    main()
