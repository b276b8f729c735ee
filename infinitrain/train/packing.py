"""Fine-tuning samples packed by length: several summarization or QA samples in one row of L = N·S tokens, so that a
short sample does not cost a whole row of padding (``data.pack``, on by default).

A sample of such a folder is one document (document, separator, answer, eos) stored padded to whole segments;
packing keeps only its real tokens and lays the samples end to end, each with its document start set. Nothing
crosses a document start: the model masks local attention to the document, a document beginning inside a segment
reads an empty memory there and writes only its own tokens (``ops.memory.document_masks``), and the token shift
restarts, exactly as in pretraining streams. So a packed sample's loss is independent of its neighbours (tested);
what changes with its offset is only where its segment boundaries fall (a sample that starts on a boundary trains
exactly as alone). Mixture-of-Depths routing picks the top tokens per segment, across documents (as in
pretraining). Rows are filled best-fit decreasing, a pure function of the lengths: on a BookSum-like length
distribution (tests/test_packing.py) padding falls from most of the computed tokens to under 1%.
Shape legend: S segment length, N segments per row, L = N·S row tokens.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from typing import Sequence

import numpy as np
import torch

from infinitrain.train.batch import Sample

PACKED_MODES = ("summarization", "qa")  # one document per sample, no label: what packing keeps exact


def stored_lengths(ds) -> tuple[np.ndarray, np.ndarray]:
    """Per sample of a ShardDataset: (stored input positions; real input positions, up to the last trained target:
    the rest is padding), read frame by frame (one pass over the split)."""
    width, real = [], []
    for k in range(len(ds.shards)):
        f = ds.shard_file(k)
        for j in range(len(f.frames)):
            for s in f.read_frame(j):
                width.append(len(s.tokens) - 1)
                ends = [int(e) for _, e in s.loss_spans]
                real.append(max(ends) if ends else len(s.tokens) - 1)
    return np.asarray(width, np.int64), np.asarray(real, np.int64)


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Sample indices per row: best fit decreasing of ``lengths`` (each <= capacity) into rows of ``capacity``
    tokens; rows in the order they were opened, members in index order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens left, row), sorted
    for i in order:
        k = bisect_left(room, (lengths[i], -1))
        if k == len(room):
            rows.append([])
            left, row = capacity, len(rows) - 1
        else:
            left, row = room.pop(k)
        rows[row].append(i)
        if left - lengths[i]:
            insort(room, (left - lengths[i], row))
    return [sorted(r) for r in rows]


def padding_fraction(real: np.ndarray, rows: int, row_len: int) -> float:
    """Share of the computed input positions (rows × L) that are padding."""
    return 1.0 - float(real.sum()) / (rows * row_len) if rows else 0.0


def padding_report(ds) -> dict:
    """What a split costs in padding: the share of computed input positions that are padding with one sample per
    row (the stored samples padded to L) and with the rows packed as training packs them (``data.pack``)."""
    L = ds.segment_len * ds.sample_segments
    _, real = stored_lengths(ds)
    rows = len(pack_rows(real.tolist(), L)) if ds.mode in PACKED_MODES else len(real)
    return {"rows_packed": rows, "padding_one_per_row": round(padding_fraction(real, len(real), L), 4),
            "padding_packed": round(padding_fraction(real, rows, L), 4)}


class PackedSource:
    """A ShardSource of a summarization or QA folder as rows of packed samples (the SampleSource protocol)."""

    def __init__(self, source):
        self.source, self.ds = source, source.ds
        self.segment_len, self.sample_len, self.vocab_size = source.segment_len, source.sample_len, source.vocab_size
        self.label_names = None
        _, self.real = stored_lengths(self.ds)
        self.rows = pack_rows(self.real.tolist(), self.sample_len)

    def __len__(self) -> int:
        return len(self.rows)

    def padding(self) -> tuple[float, float]:
        """(padding share with one sample per row, with the packed rows)."""
        return (padding_fraction(self.real, len(self.real), self.sample_len),
                padding_fraction(self.real, len(self.rows), self.sample_len))

    def __getitem__(self, i: int) -> Sample:
        L = self.sample_len
        ids = torch.full((L,), self.ds.pad_id, dtype=torch.long)
        tgt, mask, doc = ids.clone(), torch.zeros(L, dtype=torch.bool), torch.zeros(L, dtype=torch.bool)
        at = 0
        for j in self.rows[i]:
            s, n = self.ds[j], int(self.real[j])
            ids[at:at + n], tgt[at:at + n] = torch.from_numpy(s.input_ids[:n]), torch.from_numpy(s.targets[:n])
            mask[at:at + n] = torch.from_numpy(s.loss_mask[:n]) > 0
            doc[at] = True  # each sample is its own document
            doc[at + torch.from_numpy(s.doc_starts[s.doc_starts < n])] = True
            at += n
        return Sample(ids, tgt, mask, doc, int(i))
