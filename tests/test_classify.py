"""Classification: the head reads the labelled position (hand-built batch), the streamed read equals one full
forward, metrics on a hand example, the topics generator, and a CI-sized run: data topics -> prepare -> train
(task: classification, ZeRO-3) -> export carrying the head and label names -> eval classify with and without the
memory; one-line errors. The accuracy claim itself is benchmarks/quality/classify.sh (minutes, not CI)."""

from __future__ import annotations

import json
import re
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from infinitrain.errors import ConfigError, DataError
from infinitrain.evaluate.classify import class_logits, confusion_matrix, macro_f1, per_class
from infinitrain.model import InfiniLM, get_preset
from infinitrain.train.data import Sample
from infinitrain.train.tasks import LabelTargets

from naive_loss import token_loss_sum

LABELS = ("a", "b", "c")


class _Hand:
    """Two hand-built samples of 12 tokens: the last text token at position 6 (label 2) and 9 (label 0)."""

    sample_len, vocab_size = 12, 512

    def __init__(self):
        self.samples = []
        for i, (p, label) in enumerate([(6, 2), (9, 0)]):
            ids = torch.arange(12) + 10 * i
            mask = torch.zeros(12, dtype=torch.bool)
            mask[p] = True
            self.samples.append(Sample(ids, ids.roll(-1), mask, torch.arange(12) == 0, i, label))

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def _classifier(segment_len: int = 4) -> InfiniLM:
    torch.manual_seed(0)
    return InfiniLM(get_preset("debug").replace(segment_len=segment_len, labels=LABELS)).double().eval()


def test_the_head_reads_the_labelled_position():
    src = LabelTargets(_Hand(), n_classes=3)
    model = _classifier()
    ids = torch.stack([src[i].input_ids for i in range(2)])
    targets = torch.stack([src[i].targets for i in range(2)])
    mask = torch.stack([src[i].loss_mask for i in range(2)])
    assert targets[0, 6] == 2 and targets[1, 9] == 0 and targets.sum() == 2  # the label at its position, 0 elsewhere
    logits = model(ids).logits
    assert logits.shape == (2, 12, 3)
    loss, _ = token_loss_sum(logits, targets, mask)
    expected = F.cross_entropy(logits[0, 6], torch.tensor(2)) + F.cross_entropy(logits[1, 9], torch.tensor(0))
    torch.testing.assert_close(loss, expected.float())
    later = ids.clone()
    later[0, 7:] = 100  # tokens after the read position change nothing (causal)
    torch.testing.assert_close(token_loss_sum(model(later).logits, targets, mask)[0], loss)
    for t in (5, 1):  # a token before it does: in its segment, and (through the memory) in an earlier one
        earlier = ids.clone()
        earlier[0, t] = 100
        assert not torch.equal(model(earlier).logits[0, 6], logits[0, 6])  # float64: the memory's share is small
    bad = _Hand()
    bad.samples[1] = bad.samples[1]._replace(label=None)
    with pytest.raises(DataError, match="sample 1"):
        LabelTargets(bad, 3)[1]


def test_streamed_read_equals_one_forward():
    model = _classifier(segment_len=4)
    docs = [np.arange(3, 14), np.arange(20, 25), np.arange(40, 56)]  # 11, 5 and 16 tokens: 3, 2 and 4 segments
    streamed = class_logits(model, docs, segment_len=4)
    for i, d in enumerate(docs):
        full = model(torch.from_numpy(d)[None]).logits[0, -1].float()
        torch.testing.assert_close(streamed[i], full, rtol=1e-6, atol=1e-6)


def test_metrics_on_a_hand_example():
    m = confusion_matrix(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0]), 3)
    assert m.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    pc = per_class(m)
    np.testing.assert_allclose(pc["f1"], [0.5, 0.8, 0.0])
    assert macro_f1(m) == pytest.approx(1.3 / 3)
    assert macro_f1(confusion_matrix(np.array([1, 1]), np.array([1, 1]), 3)) == 1.0  # absent classes do not count


def test_topic_records():
    from infinitrain.data_tools.topics import TOPICS, evidence, topic_records

    recs = topic_records(count=60, words=120, evidence_words=10, filler="kjv", seed=3)
    assert recs == topic_records(count=60, words=120, evidence_words=10, filler="kjv", seed=3)
    keywords = {k for ks in TOPICS.values() for k in ks}
    for r in recs:
        words = r["text"].split()
        assert r["keyword"] in TOPICS[r["label"]] and r["evidence_word"] <= 10 and len(words) == r["words"] <= 120
        at = r["evidence_word"]
        assert " ".join(words[at:at + 5]) == evidence(r["keyword"])
        rest = set(re.findall(r"[a-z]+", " ".join(words[:at] + words[at + 5:]).lower()))
        assert not rest & keywords  # the filler never names a topic
    assert set(r["label"] for r in recs) == set(TOPICS)
    with pytest.raises(ConfigError, match="--filler"):
        topic_records(count=1, words=50, filler="nope")


@pytest.fixture(scope="module")
def topics_data(tmp_path_factory):
    """A small prepared classification folder: 4 segments of 16 tokens, plain filler, a 300-token tokenizer."""
    from infinitrain.data_tools.prepare import PrepareConfig, prepare
    from infinitrain.data_tools.tokenizer import save_tokenizer, train_bpe
    from infinitrain.data_tools.topics import topic_records

    d = tmp_path_factory.mktemp("topics")
    recs = topic_records(count=48, words=60, evidence_words=4, filler="plain", seed=0)
    (d / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    save_tokenizer(train_bpe((r["text"] for r in recs), vocab_size=300, min_frequency=2), d / "tok.json")
    prepare(PrepareConfig(inputs=(str(d / "t.jsonl"),), tokenizer=str(d / "tok.json"), out=str(d / "data"),
                          segment_len=16, sample_segments=4, format="classification", val_fraction=0.25,
                          progress=False))
    return d


def test_train_export_and_eval_classify(topics_data, tmp_path):
    from infinitrain.cli import cli
    from infinitrain.infer.loading import load_for_inference
    from infinitrain.train import train
    from infinitrain.train.config import load_recipe
    from infinitrain.export import export

    data = topics_data / "data"
    cfg = load_recipe("tiny-classify", ["model.segment_len=16", "data.micro_batch_size=4", "schedule.steps=4",
                                        "schedule.warmup=0", "log.every=1", "data.val_samples=4",
                                        "tbptt.window=2"], str(data))  # 2 TBPTT windows, the loss in the second
    summary = train(cfg, tmp_path / "run", "none")
    assert summary["step"] == 4 and np.isfinite(summary["val_loss"])
    index = json.loads((data / "index.json").read_text())
    names, n_val = index["labels"]["names"], index["splits"]["val"]["num_samples"]
    assert names == ["cooking", "music", "science", "sports"]
    run_model, _ = load_for_inference(tmp_path / "run", need_tokenizer=False)
    assert run_model.config.labels == tuple(names)  # config.yaml recorded them
    export(tmp_path / "run", tmp_path / "model", dtype="fp32")
    assert json.loads((tmp_path / "model" / "config.json").read_text())["model"]["labels"] == names
    exported = InfiniLM.from_pretrained(tmp_path / "model")
    ids = torch.randint(0, 300, (2, 40))
    torch.testing.assert_close(exported(ids).logits, run_model(ids).logits, rtol=0, atol=0)
    runner = CliRunner()
    for flags, name in (([], "classify.json"), (["--no-memory"], "classify-no-memory.json")):
        res = runner.invoke(cli, ["eval", "classify", str(tmp_path / "model"), "--data", str(data), "--out",
                                  str(tmp_path / "evals"), "--no-progress", *flags], catch_exceptions=False)
        assert res.exit_code == 0 and "macro-F1" in res.output and "confusion" in res.output
        report = json.loads((tmp_path / "evals" / name).read_text())
        assert n_val > 0 and report["documents"] == n_val and sum(map(sum, report["confusion"])) == n_val
        assert report["memory"] == (not flags) and report["read_segment"]["max"] == 3
        assert 0 <= report["accuracy"] <= 1 and report["labels"] == names
        assert (tmp_path / "evals" / name.replace(".json", ".png")).stat().st_size > 0  # the confusion heatmap
    # a classifier's answer to a prompt is its class, read at the last token, with the memory on or off
    from infinitrain.infer.loading import Codec
    from infinitrain.evaluate.switches import memory_read_off

    codec = Codec.from_file(topics_data / "tok.json")
    texts = [json.loads(line)["text"] for line in (topics_data / "t.jsonl").read_text().splitlines()[:2]]
    for flags in ([], ["--no-memory"]):
        res = runner.invoke(cli, ["generate", str(tmp_path / "model"), "--prompt", texts[0], "--prompt", texts[1],
                                  "--tokenizer", str(topics_data / "tok.json"), *flags], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        docs = [np.asarray(codec.encode(t)) for t in texts]
        with memory_read_off(exported) if flags else nullcontext():
            expected = [names[i] for i in class_logits(exported, docs, 16).argmax(-1).tolist()]
        assert res.stdout.split() == ["===", "prompt", "1", "===", expected[0], "===", "prompt", "2", "===",
                                      expected[1]]
        assert all(n in res.stderr for n in names)  # every class's probability


def test_classification_needs_labelled_data(tmp_path):
    from infinitrain.train.config import load_recipe
    from infinitrain.train.tasks import resolve

    text = Path(__file__).resolve().parent / "fixtures" / "pride_and_prejudice_ch1-12.txt"
    with pytest.raises(DataError, match="labelled data"):
        resolve(load_recipe("tiny-classify", [], str(text)))
    with pytest.raises(ConfigError, match="task: classification"):
        load_recipe("debug", ["model.labels=[x, y]"])
    with pytest.raises(ConfigError, match="model.labels"):
        get_preset("debug").replace(labels=["x"])


def test_a_language_model_initialises_a_classifier(tmp_path):
    """init_from an LM export: every shared tensor loads, the class head is created, the LM head is unused."""
    from infinitrain.train.init_from import load_into

    torch.manual_seed(0)
    lm = InfiniLM(get_preset("debug").replace(segment_len=16))
    lm.save_pretrained(tmp_path / "lm")
    config = lm.config.replace(labels=list(LABELS))
    clf = InfiniLM(config)
    report = load_into(clf, config, tmp_path / "lm")
    assert report.created == ("score.weight",) and report.unused == ("lm_head.weight",)
    assert all(torch.equal(p, lm.state_dict()[n]) for n, p in clf.named_parameters() if n != "score.weight")
