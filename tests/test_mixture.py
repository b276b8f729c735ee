"""Mixtures of datasets: the recipe spec, weights honoured within sampling error, exact resume, per-dataset metrics."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from infinitrain.data_tools.dataset import ShardSampler
from infinitrain.data_tools.mixture import MixtureEntry, MixtureSampler, dataset_draws, parse_mixture
from infinitrain.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
TEXT = REPO / "tests" / "fixtures" / "pride_and_prejudice_ch1-12.txt"


def test_both_recipe_forms_parse_and_bad_specs_are_one_line_config_errors():
    assert parse_mixture({"data/pg19": 0.5, "x": {"path": "data/arxiv", "weight": 2}}) == (
        MixtureEntry("pg19", "data/pg19", 0.5), MixtureEntry("x", "data/arxiv", 2.0))
    for spec, needle in [({}, "non-empty"), ({"a": 0}, "positive"), ({"a": -1.0}, "positive"),
                         ({"a": True}, "positive"), ({"a": float("nan")}, "positive"),
                         ({"a": {"path": "p"}}, "path: DIR, weight"),
                         ({"a": {"path": "p", "weight": 1, "w": 2}}, "got keys"),
                         ({"a": {"path": 3, "weight": 1}}, "path must be"), ({"d1/x": 1, "d2/x": 1}, "two datasets")]:
        with pytest.raises(ConfigError, match=needle):
            parse_mixture(spec)
    from infinitrain.train.config import TrainConfig, load_recipe

    cfg = load_recipe("debug", ["data.path={a/one: 3, b: {path: two, weight: 1}}"])
    assert cfg.data.path == {"a/one": 3, "b": {"path": "two", "weight": 1}}
    assert TrainConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg  # config.yaml round-trips
    with pytest.raises(ConfigError, match="data.path.a: weight"):
        load_recipe("debug", ["data.path={a: zero}"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weights_are_honoured_within_the_binomial_bound_and_each_dataset_cycles_through_epochs(seed):
    sizes, weights, gb, steps = [7, 50, 13], [0.5, 0.3, 0.2], 16, 1000
    sampler = MixtureSampler(["a", "b", "c"], sizes, weights, global_batch_size=gb, seed=seed)
    which, index = zip(*(sampler.next_global_batch() for _ in range(steps)))
    which, index = np.concatenate(which), np.concatenate(index)
    n = len(which)
    for d, w in enumerate(weights):
        count = int((which == d).sum())
        assert abs(count - n * w) < 4.5 * math.sqrt(n * w * (1 - w)), (d, count, n * w)  # P(false alarm) < 1e-5
    offsets = np.cumsum([0] + sizes[:-1])
    for d, size in enumerate(sizes):
        local = index[which == d] - offsets[d]
        assert np.all((0 <= local) & (local < size))
        full = len(local) // size * size  # every complete epoch of a dataset is a permutation of it
        epochs = local[:full].reshape(-1, size)
        assert len(epochs) > 10 and all(sorted(e) == list(range(size)) for e in epochs)
        assert len({tuple(e) for e in epochs}) > 1  # reshuffled each epoch
    assert sampler.samples_drawn() == [int((which == d).sum()) for d in range(3)]
    # the draws are a pure function of (seed, position): any window recomputes to the same datasets
    assert np.array_equal(dataset_draws(seed, 160, 48, weights), which[160:208])


def test_resume_mid_epoch_gives_the_same_sample_sequence_on_any_world_size():
    args = (["a", "b"], [11, 29], [1.0, 3.0])
    ref = MixtureSampler(*args, global_batch_size=8, seed=5)
    expected = [ref.next_batch().tolist() for _ in range(40)]
    first = MixtureSampler(*args, global_batch_size=8, seed=5)
    got = [first.next_batch().tolist() for _ in range(13)]
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    assert [d["batch"] for d in state["datasets"]] != [0, 0] and 0 < state["datasets"][1]["batch"]  # mid-epoch
    ranks = [MixtureSampler(*args, global_batch_size=8, rank=r, world_size=2, seed=5) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    for _ in range(27):
        got.append(ranks[0].next_batch().tolist() + ranks[1].next_batch().tolist())
    assert got == expected
    for bad in ([["a", "b"], [11, 29], [1.0, 2.0]], [["a", "c"], [11, 29], [1.0, 3.0]],
                [["a", "b"], [11, 30], [1.0, 3.0]]):
        with pytest.raises(ConfigError, match="mixture"):
            MixtureSampler(*bad, global_batch_size=8, seed=5).load_state_dict(state)
    with pytest.raises(ConfigError, match="seed"):
        MixtureSampler(*args, global_batch_size=8, seed=6).load_state_dict(state)
    with pytest.raises(ConfigError, match="mixture's; this run reads one dataset"):
        ShardSampler(40, global_batch_size=8).load_state_dict(state)
    with pytest.raises(ConfigError, match="not a mixture's"):
        MixtureSampler(*args, global_batch_size=8).load_state_dict(ShardSampler(40, global_batch_size=8).state_dict())


def test_trainer_on_a_two_dataset_mixture_logs_per_dataset_tokens_and_loss_and_resumes_exactly(tmp_path):
    """Raw text (byte-level) mixed 3:1 with a prepared folder: every row has tokens/<name> and loss/<name>, the
    tokens add up, the overall loss is the target-weighted mean of the per-dataset losses of that step, and a
    run resumed from the step-2 checkpoint logs the same steps 3-5 bit for bit."""
    from infinitrain.data_tools.prepare import PrepareConfig, prepare
    from infinitrain.data_tools.tokenizer import byte_tokenizer, save_tokenizer
    from infinitrain.train import train
    from infinitrain.train.config import load_recipe
    from infinitrain.train.data import collate, make_sampler, next_micro_batches, open_source

    save_tokenizer(byte_tokenizer(), tmp_path / "bytes.json")
    docs = [" ".join(f"item {i} is {i * i % 97}." for i in range(k, k + 60)) for k in range(0, 1200, 20)]
    (tmp_path / "syn.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    prepare(PrepareConfig(inputs=(str(tmp_path / "syn.jsonl"),), tokenizer=str(tmp_path / "bytes.json"),
                          out=str(tmp_path / "syn"), segment_len=32, sample_segments=4, val_fraction=0.2,
                          progress=False))
    mix = {"austen": {"path": str(TEXT), "weight": 3}, str(tmp_path / "syn"): 1}
    overrides = ["data.segments_per_sample=4", "data.micro_batch_size=4", "data.val_samples=8", "schedule.steps=5",
                 "schedule.warmup=1", "log.every=1", "log.eval_every=0", "log.progress=false", "tbptt.window=2",
                 "model.segment_len=32", "run.zero_stage=0", "data.seed=3", "checkpoint.save_every=2",
                 "checkpoint.keep_last=0"]
    cfg = load_recipe("debug", overrides)
    cfg = cfg.replace(data=dataclasses.replace(cfg.data, path=mix))
    out = train(cfg, tmp_path / "run", "none")
    assert out["step"] == 5
    log = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    shutil.copytree(tmp_path / "run" / "checkpoints" / "step-00000002",
                    tmp_path / "again" / "checkpoints" / "step-00000002")
    assert train(cfg, tmp_path / "again", "auto")["step"] == 5
    again = [json.loads(x) for x in (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()]
    keys = ("step", "loss", "tokens", "tokens/austen", "tokens/syn", "loss/austen", "loss/syn")
    assert [[r[k] for k in keys] for r in again if "loss" in r] == [[r[k] for k in keys] for r in steps[2:]]
    # replay the run's sampler to know which dataset each sample came from
    src, _ = open_source(mix, cfg.sample_len, cfg.model.vocab_size, cfg.data.val_fraction)
    sampler = make_sampler(src, micro_batch=4, grad_accum=1, rank=0, world=1, seed=3)
    drawn = np.zeros(2, int)
    for r in steps:
        (idx,) = next_micro_batches(sampler, 4)
        which = np.array([src.dataset_of(i) for i in idx])
        drawn += np.bincount(which, minlength=2)
        assert [r["tokens/austen"], r["tokens/syn"]] == (drawn * cfg.sample_len).tolist()
        assert r["tokens/austen"] + r["tokens/syn"] == r["tokens"]
        targets = collate([src[i] for i in idx]).loss_mask.sum(1).double().numpy()
        t = [targets[which == d].sum() for d in range(2)]
        losses = [r["loss/austen"], r["loss/syn"]]
        assert all((loss is None) == (n == 0) for loss, n in zip(losses, t))
        mean = sum(loss * n for loss, n in zip(losses, t) if n) / sum(t)
        assert mean == pytest.approx(r["loss"], rel=1e-6)  # fp32 vs fp64 summation order
    assert drawn.min() > 0 and drawn[0] > drawn[1]
    val = [r for r in log if "val_loss" in r][-1]
    assert math.isfinite(val["val_loss/austen"]) and math.isfinite(val["val_loss/syn"])
    assert val["val_loss"] == pytest.approx((3 * val["val_loss/austen"] + val["val_loss/syn"]) / 4, rel=1e-12)
