"""CLIPA-v2's text side: open_clip's Hugging Face (BERT) tokenizer with every text reduction.

The tokenizer is built here from a small word-piece vocabulary (no download); a model config
JSON points `hf_tokenizer_name` at it, as a user would point at a local bert-base-uncased copy.
"""

import inspect
import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
import open_clip  # noqa: E402
from transformers import BertTokenizerFast  # noqa: E402

from clipa.model.build import arch_config, build_tokenizer  # noqa: E402
from clipa.reduction.text import TextReducer  # noqa: E402

from conftest import run_in_process  # noqa: E402

WORDS = ("a man riding red bicycle down the street on sunny day two dogs sitting wooden bench small blue "
         "circle square big green triangle of and with near").split()
CAPTION = "a man riding a red bicycle down the street on a sunny day"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    vocab = root / "vocab.txt"
    # "bicycle" also as two pieces, so a word can cost more than one token
    vocab.write_text("\n".join(SPECIALS + WORDS + ["bi", "##cycle", "##s", ",", "."]) + "\n")
    # transformers 5 takes the vocabulary as `vocab`, 4.x as `vocab_file`
    takes = "vocab_file" if "vocab_file" in inspect.signature(BertTokenizerFast.__init__).parameters else "vocab"
    tokenizer = BertTokenizerFast(**{takes: str(vocab)}, do_lower_case=True)
    assert tokenizer.tokenize("a man riding bicycle") == ["a", "man", "riding", "bicycle"]
    tokenizer.save_pretrained(root / "tokenizer")
    return root / "tokenizer"


@pytest.fixture(scope="module")
def hf(bert_dir):
    return open_clip.tokenizer.HFTokenizer(str(bert_dir), context_length=16, strip_sep_token=True)


def pieces(tok, row):
    """The body of a row: between [CLS] and the zeroed [SEP]/padding."""
    ids = row.tolist()
    assert ids[0] == tok.tokenizer.cls_token_id
    body = []
    for i in ids[1:]:
        if i == 0:
            break
        body.append(i)
    return tok.tokenizer.convert_ids_to_tokens(body)


@pytest.mark.parametrize("strategy", ["truncate", "random", "block", "syntax"])
def test_a_caption_that_fits_is_tokenized_exactly_as_open_clip_does(hf, strategy):
    reducer = TextReducer(hf, strategy, 16)
    rows = reducer(["a red circle", CAPTION], rngs=[np.random.default_rng(0)] * 2)
    assert torch.equal(rows[0], hf(["a red circle"], context_length=16)[0])
    assert rows.shape == (2, 16)


def test_truncate_is_open_clips_truncation(hf):
    assert torch.equal(TextReducer(hf, "truncate", 8)([CAPTION]), hf([CAPTION], context_length=8))


def test_random_and_block_keep_the_budget_in_order(hf):
    full = hf.tokenizer.tokenize(CAPTION)
    for strategy in ("random", "block"):
        kept = pieces(hf, TextReducer(hf, strategy, 8)([CAPTION], rngs=[np.random.default_rng(3)])[0])
        assert len(kept) == 6  # 8 minus [CLS] and the (zeroed) [SEP]
        it = iter(full)
        assert all(token in it for token in kept)
        if strategy == "block":
            assert any(full[i:i + 6] == kept for i in range(len(full) - 5))
    starts = set()
    for seed in range(20):  # the block's start is drawn, not pinned at the caption's beginning
        kept = pieces(hf, TextReducer(hf, "block", 8)([CAPTION], rngs=[np.random.default_rng(seed)])[0])
        starts.add(next(i for i in range(len(full) - 5) if full[i:i + 6] == kept))
    assert len(starts) >= 3 and max(starts) > 0, starts


def test_syntax_keeps_nouns_first_with_word_pieces_whole(hf):
    caption = "a man riding a red bicycle down the street"
    # "bicycle" is one piece here; nouns man, bicycle, street fill a 3-token body
    assert pieces(hf, TextReducer(hf, "syntax", 5)([caption])[0]) == ["man", "bicycle", "street"]
    assert pieces(hf, TextReducer(hf, "syntax", 6)([caption])[0]) == ["man", "red", "bicycle", "street"]
    assert pieces(hf, TextReducer(hf, "syntax", 7)([caption])[0]) == ["man", "riding", "red", "bicycle", "street"]


def test_syntax_skips_a_multi_piece_word_that_does_not_fit(hf):
    """"bicycles" is two word pieces here (bicycle ##s). With a 2-token body the noun "man" fits, the
    two-piece noun does not and is skipped whole, and the smaller noun after it still fits."""
    caption = "a man riding bicycles down the street"
    assert hf.tokenizer.tokenize("bicycles") == ["bicycle", "##s"]
    assert pieces(hf, TextReducer(hf, "syntax", 4)([caption])[0]) == ["man", "street"]
    # one more slot: the pieces stay together, and "street" no longer fits
    assert pieces(hf, TextReducer(hf, "syntax", 5)([caption])[0]) == ["man", "bicycle", "##s"]


@pytest.mark.slow
def test_model_config_with_a_local_hf_tokenizer_trains_with_syntax(bert_dir, tmp_path, monkeypatch):
    config = arch_config("clipa-tiny")
    config["text_cfg"].update(hf_tokenizer_name=str(bert_dir), tokenizer_kwargs={"strip_sep_token": True},
                              vocab_size=64)
    arch = tmp_path / "tiny-bert.json"
    arch.write_text(json.dumps(config))
    tok = build_tokenizer(str(arch), 8)
    assert isinstance(tok, open_clip.tokenizer.HFTokenizer) and tok.strip_sep_token
    # The run in this process (loader too: num_workers 0), every row it tokenizes recorded.
    rows = []

    def recording_call(self, texts, rngs=None):
        out = reduce(self, texts, rngs)
        rows.extend((self, text, row) for text, row in zip(texts, out, strict=True))
        return out

    reduce = TextReducer.__call__
    monkeypatch.setattr(TextReducer, "__call__", recording_call)
    result = run_in_process("pretrain", "tiny/pretrain", "--out", tmp_path / "run", f"model.arch={arch}",
                            "reduction.text=syntax", "train.total_samples=512", "checkpoint.every_steps=0",
                            "data.num_workers=0")
    assert result.returncode == 0, result.stderr
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r and np.isfinite(r["loss"]) for r in metrics)
    # Every training caption went through the syntax reduction with this BERT vocabulary: rows of 8 ids,
    # [CLS] first, word pieces of vocab.txt only (their ids < 37 < the model's 64), never open_clip's BPE.
    assert len(rows) >= 512 and {(r.strategy, r.length) for r, _, _ in rows} == {("syntax", 8)}
    assert {r.tokenizer.tokenizer.name_or_path for r, _, _ in rows} == {str(bert_dir)}
    bert = BertTokenizerFast.from_pretrained(str(bert_dir))
    assert len(bert) == len(SPECIALS + WORDS) + 5
    for _, text, row in rows:
        assert row[0] == bert.cls_token_id and int(row.max()) < len(bert), (text, row)
    # The reduction changed what was trained on: captions longer than the 6-token body (8 less [CLS], [SEP]) kept
    # their nouns (a syntax choice) rather than their first 6 tokens (truncation).
    long = [(text, row) for _, text, row in rows if len(bert.tokenize(text)) > 6]
    assert long, "no caption needed reducing"
    truncated = TextReducer(rows[0][0].tokenizer, "truncate", 8)
    assert any(not torch.equal(row, truncated([text])[0]) for text, row in long)
    assert all(len(pieces(rows[0][0].tokenizer, row)) == 6 for _, row in long)
    # By hand: "at" and "the" go (yellow, bottom and right are not in vocab.txt: [UNK]); truncation drops
    # "bottom right" instead.
    kept = {tuple(pieces(rows[0][0].tokenizer, row)) for text, row in long
            if text == "a small yellow circle at the bottom right"}
    assert kept == {("a", "small", "[UNK]", "circle", "[UNK]", "[UNK]")}
