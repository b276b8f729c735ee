"""Packing tokenized documents into segment-aligned samples: one continuous stream (text) or one sample per record
(summarization, qa, classification)."""

from __future__ import annotations

import numpy as np

from infinitrain.data_tools.shards import PackedSample
from infinitrain.errors import ConfigError

NO_SPANS = np.zeros((0, 2), np.int32)


class StreamPacker:
    """Concatenates documents (each already ending in eos) into one stream and cuts it into samples.

    With ``L = sample_segments * segment_len``, sample ``i`` stores stream tokens ``[i*L, i*L + L]``: L input
    positions plus the target of the last one, so consecutive samples share one token and no target is lost.
    Every target of real data is trained on (the target after an eos is the next document's first token, as in
    GPT-style packing; ``doc_starts`` tells the trainer where to reset the memory). The last, partial sample is
    padded to L with ``pad_id`` and loss 0. A document starting at stream position ``p`` is in sample ``p // L``
    at position ``p % L``.
    """

    def __init__(self, *, sample_tokens: int, pad_id: int, dtype: np.dtype):
        self.L, self.pad_id, self.dtype = sample_tokens, pad_id, np.dtype(dtype)
        self.buf = np.zeros(0, self.dtype)
        self.base = 0  # stream position of buf[0] (= start of the next sample)
        self.total = 0  # stream tokens added so far
        self.docs: list[tuple[int, int]] = []  # (stream start, doc id) of documents that may still be in a sample

    def add(self, doc_id: int, tokens: np.ndarray) -> list[PackedSample]:
        """Append one document (its tokens end with eos); return the samples it completed."""
        self.docs.append((self.total, doc_id))
        self.buf = np.concatenate([self.buf, tokens.astype(self.dtype, copy=False)])
        self.total += len(tokens)
        out = []
        off = 0
        while len(self.buf) - off >= self.L + 1:
            out.append(self._sample(self.buf[off:off + self.L + 1], self.L))
            off += self.L
            self.base += self.L
            self._prune()
        self.buf = self.buf[off:]
        return out

    def finish(self) -> list[PackedSample]:
        """The padded last sample, if any input position is left."""
        n = len(self.buf) - 1
        if n < 1:
            return []
        tokens = np.full(self.L + 1, self.pad_id, self.dtype)
        tokens[:n + 1] = self.buf
        sample = self._sample(tokens, n)
        self.buf = self.buf[:0]
        return [sample]

    def _sample(self, tokens: np.ndarray, n_real: int) -> PackedSample:
        b = self.base
        starts = [s - b for s, _ in self.docs if b <= s < b + n_real]
        ids = [i for s, i in self.docs if s < b + n_real]
        return PackedSample(tokens.copy(), np.array([[0, n_real]], np.int32), np.array(starts, np.int32),
                            np.array(ids, np.int64))

    def _prune(self) -> None:
        """Forget documents that end before ``base`` (the last one starting at or before it stays)."""
        keep = 0
        for k, (s, _) in enumerate(self.docs):
            if s <= self.base:
                keep = k
        del self.docs[:keep]


def answer_sample(doc_id: int, document: np.ndarray, middle: np.ndarray, answer: np.ndarray, *, eos_id: int,
                  pad_id: int, segment_len: int, sample_segments: int, dtype: np.dtype,
                  label: int | None = None) -> PackedSample:
    """One sample ``document + middle + answer + eos``, loss on the answer and eos only.

    Summarization: middle = separator, answer = summary. QA: document = context, middle = question separator +
    question + separator. Classification: middle and answer empty, so the one trained target is the eos after
    the text, and its input position (the last text token, whose state has read the whole text) is where a
    classifier reads ``label``. Over-long rule (L = sample_segments * segment_len input positions, so at most
    L + 1 tokens): the answer keeps at most its first ``L // 2 - 1`` tokens (plus eos), the middle is kept whole,
    then the document keeps its first tokens that fit. The length is padded up to a multiple of
    ``segment_len`` (padding has loss 0), so a long document spans as many segments as it needs.
    """
    L = segment_len * sample_segments
    answer = answer[: max(0, L // 2 - 1)]
    budget = L + 1 - len(middle) - len(answer) - 1
    if budget < 1:
        raise ConfigError(f"the separator ({len(middle)} tokens) leaves no room in a sample of {L} tokens")
    document = document[:budget]
    seq = np.concatenate([document, middle, answer, [eos_id]]).astype(dtype)
    n = len(seq) - 1
    width = -(-n // segment_len) * segment_len
    tokens = np.full(width + 1, pad_id, dtype)
    tokens[: n + 1] = seq
    first = len(document) + len(middle) - 1  # input position whose target is the first answer token (or eos)
    return PackedSample(tokens, np.array([[first, n]], np.int32), np.array([0], np.int32), np.array([doc_id], np.int64),
                        label)
