"""BOS at document starts where the tokenizer's own template puts one (Llama 3's <|begin_of_text|>): prepare,
generation and the evals insert it, the shard index records it, old shards without the record keep working."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_helpers import make_docs, write_jsonl
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from infinitrain.data_tools.dataset import ShardDataset
from infinitrain.data_tools.prepare import PrepareConfig, prepare
from infinitrain.data_tools.tokenizer import byte_tokenizer, load_tokenizer, save_tokenizer, train_bpe
from infinitrain.infer.loading import Codec, _codec, data_bos

S, K = 16, 4
BEGIN, END = "<|begin_of_text|>", "<|end_of_text|>"


def llama3_style_tokenizer(path: Path) -> Path:
    """A small byte-level BPE laid out like Llama 3's tokenizer.json: its specials added after the merges (ids at
    the end of the vocabulary), and a ByteLevel + TemplateProcessing post-processor that puts <|begin_of_text|>
    before every text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(make_docs(200, seed=3), trainers.BpeTrainer(
        vocab_size=400, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([BEGIN, END])
    bos = tok.token_to_id(BEGIN)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BEGIN} $A", pair=f"{BEGIN} $A {BEGIN} $B:1",
                                      special_tokens=[(BEGIN, bos)])])
    save_tokenizer(tok, path)
    return path


@pytest.fixture(scope="module")
def llama_tok(tmp_path_factory) -> Path:
    return llama3_style_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


def run_prepare(inputs, tok, out, **kw):
    return prepare(PrepareConfig(inputs=tuple(str(i) for i in inputs), tokenizer=str(tok), out=str(out),
                                 segment_len=S, sample_segments=K, progress=False, workers=1, **kw))


def test_the_template_decides_which_tokenizers_start_documents_with_bos(llama_tok, tmp_path):
    _, info = load_tokenizer(llama_tok)
    assert info.bos_at_doc_start and info.bos_id == Tokenizer.from_file(str(llama_tok)).token_to_id(BEGIN)
    assert info.to_dict()["bos_at_doc_start"] is True
    ours = tmp_path / "ours.json"
    save_tokenizer(train_bpe(make_docs(50), vocab_size=300), ours)  # has <|bos|>, but no template puts it anywhere
    _, info = load_tokenizer(ours)
    assert info.bos_id is not None and not info.bos_at_doc_start and "bos_at_doc_start" not in info.to_dict()
    save_tokenizer(byte_tokenizer(), tmp_path / "bytes.json")
    assert not load_tokenizer(tmp_path / "bytes.json")[1].bos_at_doc_start


def test_prepare_starts_every_document_with_bos_and_records_it(llama_tok, tmp_path):
    """Pretraining stream: at every document start the BOS, then the document's tokens, then eos; the index says
    so. The same corpus with a tokenizer without a BOS template has no BOS and no record (unchanged format)."""
    docs = make_docs(60, seed=5)
    write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in docs])
    run_prepare([tmp_path / "c.jsonl"], llama_tok, tmp_path / "out", val_fraction=0.0)
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    bos = index["tokenizer"]["bos_id"]
    assert index["tokenizer"]["bos_at_doc_start"] is True
    tok, info = load_tokenizer(llama_tok)
    ds = ShardDataset(tmp_path / "out", "train")
    stream = np.concatenate([ds[i].input_ids for i in range(len(ds))])
    L = S * K
    starts = [i * L + int(p) for i in range(len(ds)) for p in ds[i].doc_starts]
    assert len(starts) == len(docs) and all(stream[p] == bos for p in starts)
    for p, text in zip(starts, docs):  # documents in input order (no validation split)
        ids = tok.encode(text, add_special_tokens=False).ids
        assert stream[p + 1:p + 1 + len(ids)].tolist() == ids and stream[p + 1 + len(ids)] == info.eos_id
    assert int((stream == bos).sum()) == len(docs)  # nowhere else
    ours = tmp_path / "ours.json"
    save_tokenizer(train_bpe(docs, vocab_size=300), ours)
    run_prepare([tmp_path / "c.jsonl"], ours, tmp_path / "plain", val_fraction=0.0)
    plain = json.loads((tmp_path / "plain" / "index.json").read_text())
    assert "bos_at_doc_start" not in plain["tokenizer"]
    first = ShardDataset(tmp_path / "plain", "train")[0]
    assert first.input_ids[0] != plain["tokenizer"]["bos_id"]


def test_prepared_records_start_with_bos(llama_tok, tmp_path):
    """Summarization samples: BOS, document, separator, summary, eos; the loss still starts at the summary."""
    write_jsonl(tmp_path / "s.jsonl", [{"document": "the river and the stone " * 5, "summary": "a river"}])
    run_prepare([tmp_path / "s.jsonl"], llama_tok, tmp_path / "out", val_fraction=0.0, format="summarization")
    tok, info = load_tokenizer(llama_tok)
    s = ShardDataset(tmp_path / "out", "train")[0]
    doc = tok.encode("the river and the stone " * 5, add_special_tokens=False).ids
    assert s.input_ids[0] == info.bos_id and s.input_ids[1:1 + len(doc)].tolist() == doc
    summary = tok.encode("a river", add_special_tokens=False).ids
    assert s.targets[s.loss_mask > 0].tolist() == summary + [info.eos_id]


def test_codec_follows_the_data_and_old_shards_keep_working(llama_tok, tmp_path):
    """Generation and the evals encode documents with the codec's BOS: the tokenizer's template says so unless
    the model's training data recorded otherwise; shards from before the record (no key) read as no BOS and still
    load, sample for sample."""
    codec = Codec.from_file(llama_tok)
    text_ids = codec.encode("a quiet river")
    assert codec.encode_document("a quiet river") == [codec.bos_id] + text_ids and codec.bos_id is not None
    write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in make_docs(20, seed=6)])
    out = tmp_path / "out"
    run_prepare([tmp_path / "c.jsonl"], llama_tok, out, val_fraction=0.0)
    assert data_bos(str(out)) is True
    assert _codec(None, [out], None, True, bos=data_bos(str(out))).bos_id == codec.bos_id
    before = [ShardDataset(out, "train")[i].input_ids for i in range(2)]
    index = json.loads((out / "index.json").read_text())
    del index["tokenizer"]["bos_at_doc_start"]  # what a prepare from before the record wrote
    (out / "index.json").write_text(json.dumps(index))
    assert data_bos(str(out)) is False
    assert _codec(None, [out], None, True, bos=data_bos(str(out))).bos_id is None
    assert all(np.array_equal(ShardDataset(out, "train")[i].input_ids, b) for i, b in enumerate(before))
    assert data_bos(str(tmp_path / "nowhere")) is None


def test_generate_feeds_bos_before_each_prompt(llama_tok):
    from infinitrain.infer.generate import Sampling
    from infinitrain.infer.textgen import generate_text
    from infinitrain.model import InfiniLM, ModelConfig

    codec = Codec.from_file(llama_tok)
    torch.manual_seed(0)
    model = InfiniLM(ModelConfig(vocab_size=codec.tokenizer.get_vocab_size(), d_model=32, n_layers=1, n_heads=2,
                                 n_kv_heads=1, d_ff=64, segment_len=8)).eval()
    fed = []
    hook = model.embed.register_forward_hook(lambda m, args, out: fed.append(args[0][:, 0].tolist()))
    res = generate_text(model, codec, ["a quiet river", "stone"], Sampling(max_new_tokens=3, temperature=0),
                        progress=False)
    hook.remove()
    assert res.prompt_tokens == [len(codec.encode(p)) + 1 for p in ("a quiet river", "stone")]
    assert sum(row.count(codec.bos_id) for row in fed) >= 2  # each prompt's stream opens with the BOS
