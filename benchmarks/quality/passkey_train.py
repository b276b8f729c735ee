"""Training records for passkey.sh in the paper's passkey format (infinitrain.data_tools.passkey.build_prompt),
as `prepare --format summarization` fields: the loss is on the "summary" only.

Differences from `infinitrain data passkey` (which makes the eval prompts): the depth is uniform in [0, 1], the
length uniform in [--min-length, --max-length] tokens, and the key may have more digits than the eval's 1..50000
(--max-digits): a longer key gives more copy targets per sample, which is what the memory has to learn. The number
of digits is uniform, so the model learns a prior on where a key ends (with 1-5 digits, a key that has 4 digits so far
ends there half the time); --max-key N draws keys uniformly from 1..N instead, the eval's distribution for N = 50000.
--loss after: the loss starts after the key's first occurrence (its second occurrence, the filler, the question
and the answer are targets; the first occurrence itself is unpredictable). --loss answer: the answer only.
Lengths are counted with --tokenizer, as in `infinitrain data passkey`."""

from __future__ import annotations

import argparse
import json
import random

from tokenizers import Tokenizer

from infinitrain.data_tools.passkey import FILLER, QUESTION, TASK, build_prompt, needle


def record(tok: Tokenizer, rng: random.Random, min_len: int, max_len: int, max_digits: int, loss: str,
           memory_fraction: float = 0.0, segment_len: int = 128, distractors: float = 0.0,
           local_fraction: float = 0.0, max_key: int = 0, boundary_fraction: float = 0.0) -> dict:
    if max_key:
        key = rng.randint(1, max_key)
    else:
        digits = rng.randint(1, max_digits)
        key = rng.randint(10 ** (digits - 1) if digits > 1 else 1, 10 ** digits - 1)
    depth, length = rng.random(), rng.randint(min_len, max_len)
    answer = f" {key}."

    def n_tokens(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False).ids)

    per_filler = n_tokens(FILLER)
    bare = n_tokens(build_prompt(key, 0, depth) + answer)
    if bare > max_len:
        raise ValueError(f"a prompt with a {len(str(key))}-digit key and no filler is {bare} tokens, over --max-length "
                         f"{max_len} (a byte-level tokenizer, or --max-digits too large?)")
    n = max(0, (length - bare) // per_filler)
    while n > 0 and n_tokens(build_prompt(key, n, depth) + answer) > length:
        n -= 1
    in_memory = on_boundary = False
    if memory_fraction and rng.random() < memory_fraction:  # the needle ends in a segment before the question's
        new_depth = _memory_depth(n_tokens, rng, key, n, per_filler, answer, segment_len, depth)
        in_memory, depth = new_depth != depth, new_depth
    # needle in the question's segment
    elif local_fraction and rng.random() < local_fraction / max(1e-9, 1 - memory_fraction):
        depth = _local_depth(n_tokens, rng, key, n, answer, segment_len, depth)
    elif boundary_fraction and rng.random() < boundary_fraction / max(1e-9, 1 - memory_fraction - local_fraction):
        new_depth = _boundary_depth(n_tokens, rng, key, n, per_filler, segment_len, depth)
        on_boundary, depth = new_depth != depth, new_depth
    prompt = build_prompt(key, n, depth)
    if distractors:
        prompt = _add_distractors(prompt, n_tokens, rng, distractors, key, length - n_tokens(answer),
                                  segment_len if in_memory else 0, keep_needle_offset=on_boundary)
    if loss == "answer":
        return {"document": prompt, "summary": answer}
    text, first = prompt + answer, f" The pass key is {key}"
    cut = text.index(first) + len(first)
    return {"document": text[:cut], "summary": text[cut:]}


DISTRACTIBLE = (" The sky is blue.", " The sun is yellow.")


def _add_distractors(prompt: str, n_tokens, rng: random.Random, p: float, key: int, budget: int,
                     segment_len: int, keep_needle_offset: bool = False) -> str:
    """Each filler sentence of DISTRACTIBLE becomes, with probability p, " The sky is <number>." (a 1-5 digit number
    that is not the key): the memory's mean then holds other digits too, so only a read that picks the digits
    after " pass key is" answers. A swap is kept only if the prompt stays within ``budget`` tokens and, when
    segment_len > 0, the needle still ends in a segment before the question's; with keep_needle_offset no sentence
    before the needle changes (the needle keeps its place in its segment)."""
    spots = [(i, d) for d in DISTRACTIBLE for i in range(len(prompt)) if prompt.startswith(d, i)]
    rng.shuffle(spots)
    spots = sorted(spots[:sum(rng.random() < p for _ in spots)], reverse=True)  # right to left: offsets stay valid
    # Token counts add up over pieces that start at a pre-token boundary (each sentence starts with a space), so a
    # swap changes the prompt's count, and the needle's end when it comes before the needle, by the sentences'
    # difference: one short encode a swap, not two of the whole prompt.
    nd, total = needle(key), n_tokens(prompt)
    at = prompt.index(nd)
    needle_end = n_tokens(prompt[:at + len(nd)]) if segment_len else 0
    question = n_tokens(QUESTION)
    for i, d in spots:
        if keep_needle_offset and i < at:
            continue
        number = rng.randint(1, 99999)
        if number == key:
            continue
        swap = d[:d.rindex(" ")] + f" {number}."
        delta = n_tokens(swap) - n_tokens(d)
        if total + delta > budget:
            continue
        end = needle_end + (delta if i < at else 0)
        if segment_len and end > (total + delta - question) // segment_len * segment_len:
            continue
        prompt = prompt[:i] + swap + prompt[i + len(d):]
        total, needle_end, at = total + delta, end, at + (len(swap) - len(d) if i < at else 0)
    return prompt


def _question_segment_start(n_tokens, key: int, n: int, answer: str, segment_len: int) -> int:
    """The first token of the segment where the question starts (the prompt's length does not depend on depth)."""
    question_start = n_tokens(build_prompt(key, n, 0.0) + answer) - n_tokens(QUESTION + answer)
    return question_start // segment_len * segment_len


def _memory_depth(n_tokens, rng: random.Random, key: int, n: int, per_filler: int, answer: str, segment_len: int,
                  depth: float) -> float:
    """A depth whose needle ends before the segment where the question starts, or ``depth`` when none exists."""
    boundary = _question_segment_start(n_tokens, key, n, answer, segment_len)
    head = n_tokens(TASK + needle(key))  # every piece starts at a pre-token boundary: token counts add up
    most = min(n, (boundary - head) // per_filler) if boundary >= head else -1
    while most >= 0 and n_tokens(TASK + FILLER * most + needle(key)) > boundary:
        most -= 1
    if most < 0:
        return depth
    return rng.randint(0, most) / n if n else 0.0


def _local_depth(n_tokens, rng: random.Random, key: int, n: int, answer: str, segment_len: int,
                 depth: float) -> float:
    """A depth whose needle starts in the segment where the question starts (local attention sees both), or
    ``depth`` when none exists."""
    boundary = _question_segment_start(n_tokens, key, n, answer, segment_len)
    least = next((i for i in range(n + 1) if n_tokens(TASK + FILLER * i) >= boundary), None)
    return depth if least is None else rng.randint(least, n) / n if n else 1.0


def _boundary_depth(n_tokens, rng: random.Random, key: int, n: int, per_filler: int, segment_len: int,
                    depth: float) -> float:
    """A depth whose needle's first sentence, from " The" to the key's last digit, straddles a segment boundary, or
    ``depth`` when none exists. The memory must then join what two segments hold: with the key's first digit on the
    boundary (the eval's depth 25% at every length, with this tokenizer), a model that rarely saw this found 21 of
    30 keys at 32K, against 435 of 450 with the needle at the other offsets (results/passkey-boundary/)."""
    task, head = n_tokens(TASK), n_tokens(needle(key).split(".")[0])  # every piece starts at a pre-token boundary
    starts = [task + b * per_filler for b in range(n + 1)]
    fits = [b for b, s in enumerate(starts) if s // segment_len != (s + head - 1) // segment_len]
    return rng.choice(fits) / n if fits and n else depth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--min-length", type=int, required=True)
    ap.add_argument("--max-length", type=int, required=True)
    ap.add_argument("--max-digits", type=int, default=5)
    ap.add_argument("--max-key", type=int, default=0,
                    help="Keys uniform in 1..N (the eval's N = 50000) in place of a uniform number of digits.")
    ap.add_argument("--loss", choices=("after", "answer"), default="after")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--memory-fraction", type=float, default=0.0,
                    help="Fraction of records whose needle ends in a segment before the question's (read via memory).")
    ap.add_argument("--local-fraction", type=float, default=0.0,
                    help="Fraction of records whose needle starts in the question's segment (read by local attention).")
    ap.add_argument("--boundary-fraction", type=float, default=0.0,
                    help="Fraction of records whose needle's first sentence (' The pass key is <key>') straddles a "
                         "segment boundary.")
    ap.add_argument("--segment-len", type=int, default=128)
    ap.add_argument("--distractors", type=float, default=0.0,
                    help="Probability that a ' The sky is blue.' / ' The sun is yellow.' filler sentence gets a random "
                         "number in place of its colour (other digits in the memory besides the key's).")
    args = ap.parse_args()
    tok, rng = Tokenizer.from_file(args.tokenizer), random.Random(args.seed)
    with open(args.out, "w") as out:
        for _ in range(args.count):
            try:
                rec = record(tok, rng, args.min_length, args.max_length, args.max_digits, args.loss,
                             args.memory_fraction, args.segment_len, args.distractors, args.local_fraction,
                             args.max_key, args.boundary_fraction)
            except ValueError as e:
                raise SystemExit(f"error: {args.tokenizer}: {e}") from None
            out.write(json.dumps(rec) + "\n")
    keys = f"keys in 1..{args.max_key}" if args.max_key else f"keys of 1-{args.max_digits} digits"
    print(f"wrote {args.out}: {args.count} records of {args.min_length}-{args.max_length} tokens, {keys}, loss on the "
          f"{args.loss}")


if __name__ == "__main__":
    main()
