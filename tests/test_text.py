"""Tokenizers: RoBERTa-like ids and offsets, save/load, phrase spans, typed refusals, offline errors."""
import json

import pytest
import torch

from mdetr_agf.errors import DownloadError, InputError, InputTypeError, UnknownNameError
from mdetr_agf.shapesworld import make_scenes, vocabulary
from mdetr_agf.text import (char_span_to_tokens, load_tokenizer, phrase_tokens, tokenize,
                            tokens_to_char_spans, train_tokenizer)


@pytest.fixture(scope="module")
def scenes():
    return make_scenes(100, 40)


@pytest.fixture(scope="module")
def tokenizer(scenes):
    return train_tokenizer([s.caption for s in scenes] + [" ".join(vocabulary())], vocab_size=400)


def test_roberta_special_ids_and_framing(tokenizer, scenes):
    assert tokenizer.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>"]) == [0, 1, 2, 3]
    assert tokenizer.pad_token_id == 1
    processor = json.loads(tokenizer.backend_tokenizer.to_str())["post_processor"]
    assert processor["type"] == "RobertaProcessing" and processor["trim_offsets"] is True
    assert processor["add_prefix_space"] is False
    captions = [s.caption for s in scenes[:8]]
    enc = tokenize(tokenizer, captions)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids.dtype == torch.long and ids.shape == mask.shape
    assert ids.shape[1] == int(mask.sum(1).max())  # padded to the longest
    for row, m in zip(ids, mask):
        n = int(m.sum())
        assert row[0] == 0 and row[n - 1] == 2
        assert (row[n:] == 1).all() and (m[n:] == 0).all()
        assert 3 not in row.tolist()  # byte-level: nothing is unknown


def test_offsets_line_up_with_characters(tokenizer, scenes):
    captions = [s.caption for s in scenes]
    enc = tokenize(tokenizer, captions)
    for b, caption in enumerate(captions):
        ends = []
        for tok, (s, e) in zip(enc["input_ids"][b].tolist(), enc["offset_mapping"][b].tolist()):
            if tok in (0, 1, 2):
                assert (s, e) == (0, 0)
                continue
            assert caption[s:e] == tokenizer.decode([tok]).strip()
            ends.append(e)
        assert ends == sorted(ends) and ends[-1] == len(caption)


def test_save_load_round_trip(tokenizer, scenes, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert load_tokenizer(str(tmp_path)) is loaded  # cached per name
    captions = [s.caption for s in scenes[:10]]
    a, b = tokenize(tokenizer, captions), tokenize(loaded, captions)
    for key in ("input_ids", "attention_mask", "offset_mapping"):
        assert torch.equal(a[key], b[key])


def test_phrase_tokens_cover_phrase_spans(tokenizer, scenes):
    captions = [s.caption for s in scenes]
    enc = tokenize(tokenizer, captions)
    for b, scene in enumerate(scenes):
        for phrase in scene.phrases:
            positions = phrase_tokens(enc, scene.caption, phrase.text, batch_index=b)
            assert positions and positions == list(range(positions[0], positions[-1] + 1))
            assert tokens_to_char_spans(enc, b, positions) == [phrase.char_span] or scene.caption.count(phrase.text) > 1
            assert char_span_to_tokens(enc, b, *phrase.char_span) == positions or scene.caption.count(phrase.text) > 1
            assert phrase_tokens(enc, scene.caption, phrase.text.upper(), batch_index=b) == positions


def test_absent_phrase_raises_lookup_error(tokenizer):
    caption = "the small red circle"
    enc = tokenize(tokenizer, [caption])
    with pytest.raises(LookupError) as info:
        phrase_tokens(enc, caption, "blue square")
    assert isinstance(info.value, UnknownNameError)
    assert "blue square" in str(info.value) and caption in str(info.value)


def test_span_helpers(tokenizer):
    caption = "the small red circle left of a blue star"
    enc = tokenize(tokenizer, [caption])
    red = char_span_to_tokens(enc, 0, caption.index("red"), caption.index("red") + 3)
    assert len(red) >= 1 and tokens_to_char_spans(enc, 0, red) == [(10, 13)]
    # partial overlap still counts; special tokens cover nothing
    assert char_span_to_tokens(enc, 0, 11, 12) == red
    n = int(enc["attention_mask"][0].sum())
    assert tokens_to_char_spans(enc, 0, [0, n - 1]) == []
    everything = tokens_to_char_spans(enc, 0, range(n))
    assert everything == [(0, len(caption))]
    first, last = char_span_to_tokens(enc, 0, 0, 3), char_span_to_tokens(enc, 0, 36, 40)
    assert tokens_to_char_spans(enc, 0, first + last) == [(0, 3), (36, 40)]
    assert tokens_to_char_spans(enc, 0, torch.tensor(last + first)) == [(0, 3), (36, 40)]
    with pytest.raises(InputError):
        tokens_to_char_spans(enc, 0, [n + 50])
    with pytest.raises(InputError):
        char_span_to_tokens(enc, 0, 5, 5)
    with pytest.raises(InputError):
        char_span_to_tokens(enc, 3, 0, 3)


def test_too_long_caption_refused(tokenizer):
    caption = " ".join(["small red circle"] * 120)
    n = len(tokenizer(caption)["input_ids"])
    assert n > 256
    with pytest.raises(InputError) as info:
        tokenize(tokenizer, ["a blue star", caption])
    assert str(n) in str(info.value) and "256" in str(info.value) and "captions[1]" in str(info.value)
    with pytest.raises(InputError):
        tokenize(tokenizer, ["the small red circle left of a blue star"], max_positions=5)


@pytest.mark.parametrize("captions, error", [
    ([""], InputError), (["  \n"], InputError), (["ok", ""], InputError), ([], InputError),
    ("the red circle", InputTypeError), ([3], InputTypeError), (["ok", None], InputTypeError),
    (None, InputTypeError), ([b"bytes"], InputTypeError),
])
def test_bad_captions_refused(tokenizer, captions, error):
    with pytest.raises(error) as info:
        tokenize(tokenizer, captions)
    assert "caption" in str(info.value)


def test_train_tokenizer_refuses_bad_input():
    with pytest.raises(InputTypeError):
        train_tokenizer("the red circle")
    with pytest.raises(InputTypeError):
        train_tokenizer(["ok", 3])
    with pytest.raises(InputError):
        train_tokenizer(["", " "])
    with pytest.raises(InputError):
        train_tokenizer(["ok"], vocab_size=10)


def test_load_tokenizer_offline_raises_download_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    load_tokenizer.cache_clear()
    with pytest.raises(DownloadError) as info:
        load_tokenizer("roberta-base", cache_dir=tmp_path / "empty-cache")
    message = str(info.value)
    assert isinstance(info.value, OSError)
    for needle in ("roberta-base", "vocab.json", "merges.txt", "HF_HUB_OFFLINE", "tokenizer=FOLDER", "--tokenizer", "connect"):
        assert needle in message, needle


def test_load_tokenizer_bad_paths(tmp_path):
    with pytest.raises(InputError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)
    with pytest.raises(InputError, match="no such directory"):
        load_tokenizer(tmp_path / "missing" / "dir")
    with pytest.raises(InputTypeError):
        load_tokenizer(42)
