"""Fine-tuning samples packed by length (``data.pack``): padding on a BookSum-like length distribution, rows that
hold every sample once, and packed samples that do not see each other."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from test_data_helpers import invoke, write_jsonl

from infinitrain.data_tools.prepare import PrepareConfig, prepare
from infinitrain.data_tools.tokenizer import byte_tokenizer, save_tokenizer
from infinitrain.data_tools.verify import inspect_dir
from infinitrain.train.data import ShardSource, open_source
from infinitrain.train.packing import PackedSource, pack_rows

S, N = 16, 16  # rows of 256 tokens: BookSum's 32K inputs of 2048-token segments, scaled down 128 times


@pytest.fixture(scope="module")
def booksum_like(tmp_path_factory):
    """400 summarization records whose document lengths follow BookSum's chapter level scaled to these rows:
    log-normal, median 16% of a row (5.1K of 32K tokens), sigma 0.9, the longest cut to a row by prepare;
    summaries of 4-12 tokens (BookSum's ~400 of 32K)."""
    d = tmp_path_factory.mktemp("booksum")
    rng = random.Random(7)
    words = "the river stone winter light garden quiet answer north seven".split()

    def text(n):
        out = ""
        while len(out) < n:
            out += rng.choice(words) + " "
        return out[:n]

    records = [{"document": text(max(8, int(math.exp(rng.gauss(math.log(0.16 * S * N), 0.9))))),
                "summary": text(rng.randint(4, 12))} for _ in range(400)]
    write_jsonl(d / "books.jsonl", records)
    save_tokenizer(byte_tokenizer(), d / "bytes.json")
    prepare(PrepareConfig(inputs=(str(d / "books.jsonl"),), tokenizer=str(d / "bytes.json"), out=str(d / "out"),
                          format="summarization", segment_len=S, sample_segments=N, val_fraction=0.1, progress=False))
    return d / "out"


def test_booksum_like_lengths_pad_under_10_percent_packed_and_inspect_says_so(booksum_like):
    train, val = open_source(str(booksum_like), S * N, 512, 0.0, pack=True)
    assert isinstance(train, PackedSource) and isinstance(val, ShardSource)  # validation: one sample per row
    one_per_row, packed = train.padding()
    print(f"padding: one sample per row {one_per_row:.1%}, packed {packed:.1%} ({len(train.real)} samples in "
          f"{len(train)} rows)")
    assert one_per_row > 0.6 and packed < 0.10
    report = inspect_dir(booksum_like)["splits"]["train"]
    assert report["padding_packed"] == round(packed, 4) and report["padding_one_per_row"] == round(one_per_row, 4)
    assert report["rows_packed"] == len(train)
    shown = json.loads(invoke("data", "inspect", str(booksum_like)).output)
    assert shown["splits"]["train"]["padding_packed"] == report["padding_packed"]
    unpacked, _ = open_source(str(booksum_like), S * N, 512, 0.0, pack=False)
    assert type(unpacked) is ShardSource and len(unpacked) == len(train.real)


def test_rows_hold_every_sample_once_with_its_tokens_loss_and_document_start(booksum_like):
    train = PackedSource(ShardSource(booksum_like, "train"))
    members = sorted(j for row in train.rows for j in row)
    assert members == list(range(len(train.ds)))
    for i in range(len(train)):
        row, at = train[i], 0
        for j in train.rows[i]:
            s, n = train.ds[j], int(train.real[j])
            assert row.doc_start[at] and not row.doc_start[at + 1:at + n].any()
            assert torch.equal(row.input_ids[at:at + n], torch.from_numpy(s.input_ids[:n]))
            assert torch.equal(row.targets[at:at + n], torch.from_numpy(s.targets[:n]))
            assert torch.equal(row.loss_mask[at:at + n], torch.from_numpy(s.loss_mask[:n]) > 0)
            assert s.loss_mask[n:].sum() == 0  # what is left out is padding
            at += n
        assert at <= S * N and not row.loss_mask[at:].any() and not row.doc_start[at:].any()


def test_best_fit_decreasing_fills_rows():
    assert pack_rows([5, 3, 4, 2, 8, 1, 1], 8) == [[4], [0, 1], [2, 3, 5, 6]]
    assert pack_rows([8, 8], 8) == [[0], [1]]


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_a_packed_sample_trains_independently_of_its_neighbours(booksum_like, update):
    """In one packed row, every token loss of a sample (and the gradient it sends to its own input embeddings) is
    unchanged when the other samples' tokens are replaced; a sample that starts on a segment boundary has exactly
    the losses it has alone. A float64 model, so "unchanged" is to 1e-12."""
    from infinitrain.model import InfiniLM, ModelConfig

    torch.manual_seed(0)
    model = InfiniLM(ModelConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                 segment_len=S, update=update, gate_init=0.5)).double()
    train = PackedSource(ShardSource(booksum_like, "train"))
    i = next(k for k, r in enumerate(train.rows) if len(r) >= 3)
    row = train[i]
    starts = row.doc_start.nonzero().flatten().tolist()
    a, b = starts[1], starts[2]  # the second sample of the row

    def losses(ids):
        x = ids[None].clone()
        out = model(x, doc_start=row.doc_start[None], targets=row.targets[None], loss_mask=row.loss_mask[None])
        return out.token_loss[0]

    base = losses(row.input_ids)
    other = row.input_ids.clone()
    g = torch.Generator().manual_seed(1)
    other[:a] = torch.randint(0, 256, (a,), generator=g)  # the first sample's tokens, replaced
    other[b:] = torch.randint(0, 256, (len(other) - b,), generator=g)  # and everything after the second
    torch.testing.assert_close(losses(other)[a:b], base[a:b], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(losses(other)[:a], base[:a])  # the replaced tokens did change their own losses
    # the first sample starts on a boundary (position 0): its losses are those of the sample alone
    j = train.rows[i][0]
    s, n = train.ds[j], int(train.real[j])
    alone = model(torch.from_numpy(s.input_ids[None]).long(), doc_start=torch.from_numpy(
        np.isin(np.arange(len(s.input_ids)), s.doc_starts))[None], targets=torch.from_numpy(s.targets[None]).long(),
                  loss_mask=torch.from_numpy(s.loss_mask[None]) > 0).token_loss[0]
    torch.testing.assert_close(base[:n], alone[:n], rtol=1e-12, atol=1e-12)
