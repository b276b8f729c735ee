"""`infinitrain data passkey`: the Infini-attention paper's passkey retrieval samples (arXiv 2404.07143, via the HF
blog).

Each record is ``{"text", "prompt", "context", "question", "answer", "pass_key", "depth", "length", "tokens"}``:
``context`` is the task, filler and needle, ``question`` is " What is the pass key? The pass key is",
``prompt = context + question``, ``answer`` is " <key>." and ``text = prompt + answer``. Train on all tokens
with ``prepare --format jsonl`` (field ``text``) or on the answer only with
``prepare --format qa --question-separator "" --answer-separator ""``, whose samples are exactly the tokens of
``text`` (every field starts at a pre-token boundary) with the loss on the answer and eos.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from tokenizers import Tokenizer

from infinitrain.errors import ConfigError

TASK = ("There is important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = " What is the pass key? The pass key is"


def needle(key: int) -> str:
    return f" The pass key is {key}. Remember it. {key} is the pass key."


def build_context(key: int, n_filler: int, depth: float) -> str:
    """Task, then ``round(n_filler * depth)`` fillers, the needle, and the other fillers.

    ``depth`` 0 puts the needle right after the task (farthest from the question), 1 right before the question.
    """
    before = round(n_filler * depth)
    return TASK + FILLER * before + needle(key) + FILLER * (n_filler - before)


def build_prompt(key: int, n_filler: int, depth: float) -> str:
    """The context followed by the question."""
    return build_context(key, n_filler, depth) + QUESTION


def passkey_records(tok: Tokenizer, *, length: int, depths: Sequence[float], count: int, seed: int = 0) -> list[dict]:
    """``count`` records per depth whose ``text`` is at most ``length`` tokens (as long as fits), in a fixed order."""
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise ConfigError(f"--depths must be fractions in [0, 1] or percents in [0, 100], got {list(depths)}")
    if count < 1:
        raise ConfigError(f"--count must be >= 1, got {count}")

    def n_tokens(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False).ids)

    rng = random.Random(seed)
    out = []
    per_filler = max(1, n_tokens(FILLER * 64) // 64)
    for depth in depths:
        for _ in range(count):
            key = rng.randint(1, 50000)
            answer = f" {key}."
            fixed = n_tokens(build_prompt(key, 0, depth) + answer)
            if fixed > length:
                raise ConfigError(f"--length {length} is shorter than the prompt without filler ({fixed} tokens)")
            n = (length - fixed) // per_filler + 1
            while n > 0 and n_tokens(build_prompt(key, n, depth) + answer) > length:
                n -= 1
            context = build_context(key, n, depth)
            prompt = context + QUESTION
            out.append({"text": prompt + answer, "prompt": prompt, "context": context, "question": QUESTION,
                        "answer": answer, "pass_key": key, "depth": depth, "length": length,
                        "tokens": n_tokens(prompt + answer)})
    return out


def parse_depths(spec: str) -> list[float]:
    """'0,25,50,75,100' (percent) or '0,0.5,1' (fractions: every value <= 1) -> fractions."""
    try:
        values = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--depths must be comma-separated numbers, got {spec!r}") from None
    if values and max(values) > 1:
        values = [v / 100 for v in values]
    return values
