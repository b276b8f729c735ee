"""Tests for the shard format (writer/reader symmetry, corruption detection), packing, and the resumable sampler."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from infinitrain.data_tools.dataset import ShardDataset, ShardSampler, epoch_order, eval_indices
from infinitrain.data_tools.pack import StreamPacker, answer_sample
from infinitrain.data_tools.shards import (PackedSample, ShardFile, ShardWriter, decode_frame, encode_frame,
                                           make_index, write_index)
from infinitrain.errors import ConfigError, ShardCorruptError

TOK = {"sha256": "0" * 64, "vocab_size": 70000, "eos_id": 1, "bos_id": 0, "pad_id": 2}


def random_samples(n, seed=0, vocab=70000, width=40):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        t = rng.integers(0, vocab, rng.integers(4, width))
        starts = np.sort(rng.choice(len(t) - 1, rng.integers(0, 3), replace=False)).astype(np.int32)
        out.append(PackedSample(t, np.array([[0, len(t) - 1]], np.int32), starts,
                                rng.integers(0, 10**12, len(starts) + 1)))
    return out


def write_split(tmp_path, samples, dtype="<u4", **kw):
    w = ShardWriter(tmp_path, "train", np.dtype(dtype), shard_bytes=kw.get("shard_bytes", 3000),
                    frame_bytes=kw.get("frame_bytes", 700))
    for s in samples:
        w.add(s)
    entries = w.close()
    write_index(tmp_path, make_index(tokenizer=TOK, dtype=np.dtype(dtype), segment_len=4, sample_segments=2,
                                     mode="pretrain", splits={"train": entries}, zstd_level=3))
    return entries


def same(a: PackedSample, b: PackedSample) -> bool:
    return a.label == b.label and all(np.array_equal(x, y) for x, y in zip(
        (a.tokens, a.loss_spans, a.doc_starts, a.doc_ids), (b.tokens, b.loss_spans, b.doc_starts, b.doc_ids)))


def test_frame_encoding_round_trips_in_both_versions():
    samples = random_samples(50)
    got = decode_frame(encode_frame(samples, np.dtype("<u4")), np.dtype("<u4"))
    assert len(got) == 50 and all(same(a, b) for a, b in zip(samples, got))
    with pytest.raises(ValueError):
        decode_frame(encode_frame(samples, np.dtype("<u4")) + b"x", np.dtype("<u4"))
    labelled = [dataclasses.replace(s, label=None if i % 7 == 0 else i % 3) for i, s in enumerate(samples)]
    raw = encode_frame(labelled, np.dtype("<u4"), version=2)
    assert len(raw) == len(encode_frame(samples, np.dtype("<u4"))) + 4 * 50
    got = decode_frame(raw, np.dtype("<u4"), version=2)
    assert all(same(a, b) for a, b in zip(labelled, got)) and got[0].label is None and got[1].label == 1
    with pytest.raises(ValueError, match="cannot hold labels"):
        encode_frame(labelled, np.dtype("<u4"), version=1)


def test_writer_reader_round_trip_over_many_shards_and_frames(tmp_path):
    samples = random_samples(300, seed=1)
    entries = write_split(tmp_path, samples)
    assert len(entries) > 3 and not list(tmp_path.glob("*.tmp"))
    assert [e["first_sample"] for e in entries] == list(np.cumsum([0] + [e["num_samples"] for e in entries])[:-1])
    assert max(len(ShardFile(tmp_path / e["name"], np.dtype("<u4"), entry=e).frames) for e in entries) > 2
    ds = ShardDataset(tmp_path, "train")
    assert len(ds) == 300 and (ds.segment_len, ds.sample_segments) == (4, 2)
    for i in [*range(300), 17, 0, 299, 150]:  # sequential, then jumping back across shards and frames
        s, p = ds[i], samples[i]
        assert s.sample_id == i
        assert np.array_equal(s.input_ids, p.tokens[:-1]) and np.array_equal(s.targets, p.tokens[1:])
        assert s.input_ids.dtype == np.int64 and s.loss_mask.sum() == len(p.tokens) - 1
        assert np.array_equal(s.doc_starts, p.doc_starts) and np.array_equal(s.doc_ids, p.doc_ids)
    with pytest.raises(IndexError):
        ds[300]


def test_trainer_view_pads_each_stored_record_to_the_sample_length(tmp_path):
    # The one conversion from a stored Record (variable length, numpy) to the trainer's Sample (N*S tensors).
    from infinitrain.train.data import ShardSource, collate

    samples = random_samples(40, seed=3, width=10)  # records of 3..8 input tokens, N*S = 8
    write_split(tmp_path, samples)
    ds, src = ShardDataset(tmp_path, "train"), ShardSource(tmp_path, "train")
    assert src.sample_len == 8 and len(src) == len(ds) == 40
    for i in range(40):
        r, s = ds[i], src[i]
        n = len(r.input_ids)
        assert s.input_ids[:n].tolist() == r.input_ids.tolist() and s.targets[:n].tolist() == r.targets.tolist()
        assert (s.input_ids[n:] == ds.pad_id).all() and not s.loss_mask[n:].any()
        assert s.loss_mask[:n].tolist() == (r.loss_mask > 0).tolist()
        assert s.doc_start.nonzero().flatten().tolist() == r.doc_starts.tolist() and s.sample_id == i
    batch = collate([src[0], src[5]])
    assert batch.input_ids.shape == (2, 8) and batch.sample_ids.tolist() == [0, 5] and batch.labels is None


def test_output_is_byte_identical_for_identical_input(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    ea, eb = write_split(a, random_samples(80, seed=2)), write_split(b, random_samples(80, seed=2))
    assert ea == eb and all((a / e["name"]).read_bytes() == (b / e["name"]).read_bytes() for e in ea)


def test_every_bit_flip_and_truncation_is_detected_naming_the_shard(tmp_path):
    entries = write_split(tmp_path, random_samples(40, seed=3), shard_bytes=1 << 20)
    assert len(entries) == 1
    entry = entries[0]
    path = tmp_path / entry["name"]
    good = path.read_bytes()
    rng = random.Random(0)
    for trial in range(1000):
        data = bytearray(good)
        if trial % 4 == 3:
            data = data[: rng.randrange(len(data))]  # truncation at a random offset
        else:
            bit = rng.randrange(len(data) * 8)
            data[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bytes(data))
        with pytest.raises(ShardCorruptError,
                           match=f"{entry['name']}: sha256 expected {entry['sha256']} got [0-9a-f]{{64}}"):
            ShardFile(path, np.dtype("<u4"), entry=entry)
    path.write_bytes(good)
    ShardFile(path, np.dtype("<u4"), entry=entry)


def test_frame_checksums_catch_corruption_even_without_the_index_hash(tmp_path):
    entry = write_split(tmp_path, random_samples(40, seed=4), shard_bytes=1 << 20)[0]
    path = tmp_path / entry["name"]
    shard = ShardFile(path, np.dtype("<u4"))
    off, size, _, _ = shard.frames[1]
    data = bytearray(path.read_bytes())
    data[off + size // 2] ^= 0x10  # inside the compressed payload of frame 1
    path.write_bytes(bytes(data))
    shard = ShardFile(path, np.dtype("<u4"))  # footer and trailer are intact, so it opens
    shard.read_frame(0)
    with pytest.raises(ShardCorruptError, match=f"{entry['name']}: zstd frame at byte {off}"):
        shard.read_frame(1)
    path.write_bytes(bytes(data[:-3]))
    with pytest.raises(ShardCorruptError, match="bad trailer"):
        ShardFile(path, np.dtype("<u4"))


def test_stream_packer_samples_are_segment_aligned_and_cover_the_stream():
    rng = np.random.default_rng(5)
    docs = [np.append(rng.integers(3, 100, rng.integers(1, 30)), 1) for _ in range(40)]
    L = 8
    p = StreamPacker(sample_tokens=L, pad_id=2, dtype=np.dtype("<u2"))
    samples, starts = [], []
    for i, d in enumerate(docs):
        starts.append(p.total)
        samples += p.add(100 + i, d)
    samples += p.finish()
    stream = np.concatenate(docs)
    assert all(len(s.tokens) == L + 1 for s in samples)
    assert len(samples) == -(-(len(stream) - 1) // L)
    for i, s in enumerate(samples):
        real = int(s.loss_spans[0, 1])
        assert np.array_equal(s.tokens[: real + 1], stream[i * L: i * L + real + 1])
        assert np.all(s.tokens[real + 1:] == 2)
        assert sorted(s.doc_starts.tolist()) == [x - i * L for x in starts if i * L <= x < i * L + real]
        covered = [100 + k for k, x in enumerate(starts) if x < i * L + real and x + len(docs[k]) > i * L]
        assert s.doc_ids.tolist() == covered


def test_answer_sample_masks_the_summary_and_cuts_long_documents_by_the_stated_rule():
    doc, sep, summ = np.arange(10, 30), np.array([7, 8]), np.array([40, 41, 42])
    s = answer_sample(5, doc, sep, summ, eos_id=1, pad_id=2, segment_len=8, sample_segments=4, dtype=np.dtype("<u2"))
    n = 20 + 2 + 3 + 1 - 1
    assert len(s.tokens) == 32 + 1 and s.loss_spans.tolist() == [[21, n]]
    assert s.tokens[22:26].tolist() == [40, 41, 42, 1] and np.all(s.tokens[n + 1:] == 2)
    s = answer_sample(5, np.arange(100, 200), sep, np.arange(300, 330), eos_id=1, pad_id=2, segment_len=8,
                       sample_segments=4, dtype=np.dtype("<u2"))  # L = 32: summary keeps 15 (+eos), doc keeps 15
    assert s.tokens.tolist() == list(range(100, 115)) + [7, 8] + list(range(300, 315)) + [1]
    assert s.loss_spans.tolist() == [[16, 32]]
    with pytest.raises(ConfigError, match="separator"):
        answer_sample(5, doc, np.arange(40), summ, eos_id=1, pad_id=2, segment_len=8, sample_segments=4,
                       dtype=np.dtype("<u2"))


def test_sampler_is_deterministic_disjoint_world_size_independent_and_resumes_exactly():
    n, gb = 103, 8
    assert sorted(epoch_order(n, 7, 0).tolist()) == list(range(n))
    assert epoch_order(n, 7, 0).tolist() == epoch_order(n, 7, 0).tolist()
    assert epoch_order(n, 7, 0).tolist() != epoch_order(n, 7, 1).tolist() != epoch_order(n, 8, 0).tolist()
    one = ShardSampler(n, global_batch_size=gb, seed=7)
    two = [ShardSampler(n, global_batch_size=gb, seed=7, rank=r, world_size=2) for r in range(2)]
    seen_epoch0 = []
    for step in range(30):  # 12 batches per epoch: crosses two epoch boundaries
        g = one.next_batch()
        parts = [s.next_batch() for s in two]
        assert np.array_equal(np.concatenate(parts), g) and not set(parts[0]) & set(parts[1])
        if step < one.batches_per_epoch:
            seen_epoch0 += g.tolist()
    assert len(set(seen_epoch0)) == 12 * gb  # no repeats within an epoch
    # resume mid-epoch on a different world size: same global stream
    ref = ShardSampler(n, global_batch_size=gb, seed=7)
    stream = [ref.next_batch() for _ in range(20)]
    a = ShardSampler(n, global_batch_size=gb, seed=7)
    for _ in range(9):
        a.next_batch()
    state = a.state_dict()
    assert state == {"version": 1, "seed": 7, "epoch": 0, "batch": 9, "num_samples": n, "global_batch_size": gb,
                     "shuffle": True}
    resumed = [ShardSampler(n, global_batch_size=gb, seed=7, rank=r, world_size=4) for r in range(4)]
    for s in resumed:
        s.load_state_dict(state)
    for k in range(9, 20):
        assert np.array_equal(np.concatenate([s.next_batch() for s in resumed]), stream[k])
    with pytest.raises(ConfigError, match="global_batch_size=8, this run has 16"):
        ShardSampler(n, global_batch_size=16, seed=7).load_state_dict(state)
    with pytest.raises(ConfigError, match="multiple of world size"):
        ShardSampler(n, global_batch_size=6, world_size=4)
    assert sorted(np.concatenate([eval_indices(n, r, 3) for r in range(3)]).tolist()) == list(range(n))
