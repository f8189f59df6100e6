"""``load_model``'s ``tokenizer=`` (a local folder instead of the Hugging Face hub) and ``device=`` checks.

The tokenizer folders are built here with the ``tokenizers`` package, laid out as ``roberta-base``
ships its files (``vocab.json`` + ``merges.txt``) or as ``save_pretrained`` writes them."""
import random
import string

import pytest
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import RobertaTokenizerFast

from mdetr_agf import load_model, predict
from mdetr_agf.errors import DownloadError, FileMissingError, InputError, InputTypeError
from mdetr_agf.shapesworld import make_scene, vocabulary
from mdetr_agf.text import SPECIAL_TOKENS, load_tokenizer

from conftest import write_zenodo_checkpoint

CAPTION = "the small red circle left of a large blue star"


def roberta_style_folder(folder, texts, vocab_size):
    """vocab.json + merges.txt, RoBERTa's special tokens first: the two files roberta-base is made of."""
    bpe = ByteLevelBPETokenizer(add_prefix_space=False, trim_offsets=True)
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, show_progress=False,
                            special_tokens=list(SPECIAL_TOKENS))
    folder.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(folder))
    return folder


@pytest.fixture(autouse=True)
def fresh_tokenizer_cache():
    load_tokenizer.cache_clear()
    yield
    load_tokenizer.cache_clear()


@pytest.fixture
def offline_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def ids(tokenizer, text=CAPTION):
    return tokenizer(text)["input_ids"]


def test_a_local_folder_replaces_the_models_tokenizer(tmp_path, offline_hub):
    # words split into pieces (a small vocabulary), so its ids differ from the bundled tokenizer's
    folder = roberta_style_folder(tmp_path / "tok", [" ".join(vocabulary())] * 4, vocab_size=280)
    bundled = load_model("toy").get_tokenizer()
    model = load_model("toy", tokenizer=folder)
    expected = RobertaTokenizerFast.from_pretrained(str(folder))
    assert model.get_tokenizer().get_vocab() == expected.get_vocab()
    assert ids(model.get_tokenizer()) == ids(expected) != ids(bundled)
    scene = make_scene(1_000_003)
    assert predict(model, scene.image, scene.caption).caption == scene.caption  # runs end to end on it


def test_a_save_pretrained_folder_given_as_a_string(tmp_path, offline_hub):
    bundled = load_model("toy").get_tokenizer()
    bundled.save_pretrained(str(tmp_path / "saved"))
    model = load_model("toy", tokenizer=str(tmp_path / "saved"))
    assert model.get_tokenizer() is not bundled and ids(model.get_tokenizer()) == ids(bundled)


def test_a_real_mdetr_layout_uses_the_folder_instead_of_the_hub(tmp_path, offline_hub):
    """mdetr_clevr names distilroberta-base; with HF_HUB_OFFLINE=1 only the folder can serve its captions."""
    checkpoint = write_zenodo_checkpoint("mdetr_clevr", tmp_path / "clevr_checkpoint.pth")
    words = ["cube", "sphere", "cylinder", "metal", "rubber", "how", "many", "are", "there", "?"]
    folder = roberta_style_folder(tmp_path / "tok", [" ".join(words + vocabulary())] * 4, vocab_size=400)
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE"):  # without the folder: the hub is off
        load_model("mdetr_clevr", checkpoint=checkpoint).get_tokenizer()
    model = load_model("mdetr_clevr", checkpoint=checkpoint, tokenizer=folder)
    result = predict(model, make_scene(5).image, "how many red metal cubes are there ?")
    assert result.answer is not None
    assert ids(model.get_tokenizer(), "red cube") == ids(RobertaTokenizerFast.from_pretrained(str(folder)), "red cube")


def test_a_tokenizer_larger_than_the_text_encoder_is_refused(tmp_path, offline_hub):
    rng = random.Random(0)
    texts = [" ".join("".join(rng.choices(string.ascii_lowercase, k=6)) for _ in range(50)) for _ in range(200)]
    folder = roberta_style_folder(tmp_path / "big", texts, vocab_size=1000)
    assert len(RobertaTokenizerFast.from_pretrained(str(folder))) > 350
    with pytest.raises(InputError, match="embeds only 350"):
        load_model("toy", tokenizer=folder)


def test_a_missing_or_empty_folder_is_named(tmp_path, offline_hub, cache):
    with pytest.raises(FileMissingError, match="tokenizer folder not found"):
        load_model("mdetr_resnet101", tokenizer=tmp_path / "nowhere")  # before any download
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no tokenizer"):
        load_model("mdetr_resnet101", tokenizer=tmp_path / "empty")
    assert not cache.exists() or not any(cache.iterdir()), "nothing was downloaded"


def test_the_device_is_checked_before_any_download(cache, monkeypatch):
    monkeypatch.setenv("MDETR_AGF_MIRROR", "http://127.0.0.1:9/")  # would fail as a download, not as a device
    with pytest.raises(InputError, match="'gpu' is not a device"):
        load_model("mdetr_resnet101", device="gpu")
    with pytest.raises(InputTypeError, match="device must be"):
        load_model("toy", device=0)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="asks for a CUDA GPU"):
            load_model("mdetr_resnet101", device="cuda")
    assert load_model("toy", device="cpu").class_embed.weight.device.type == "cpu"
