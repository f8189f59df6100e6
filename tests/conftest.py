"""Shared fixtures: where the conformance ground truth lives, and Zenodo-format files made from it.

The ground truth (``shared/conformance`` beside the checkout, or ``$MDETR_AGF_CONFORMANCE``)
is present in CI; in a user's clone it is absent and the tests that need it skip, saying so.
"""
import argparse
import importlib.util
import json
import os
from pathlib import Path

# MKL picks its kernels by CPU (AVX-512, AMX, ...) and, unless told otherwise, may sum in an order
# that differs between CPUs and even between runs. The ground truth was recorded on another CPU
# and several tests compare maps bit for bit across calls, so MKL is asked for its reproducible
# mode before torch loads it (also inherited by the subprocesses the tests start).
os.environ.setdefault("MKL_CBWR", "COMPATIBLE")

import pytest  # noqa: E402
import torch  # noqa: E402

from mdetr_agf.models.build import ModelConfig, build_model
from mdetr_agf.models.text_encoder import TextConfig
from mdetr_agf.text import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
CONFORMANCE = Path(os.environ.get("MDETR_AGF_CONFORMANCE", REPO.parent / "shared" / "conformance"))


def conformance_path(*parts):
    path = CONFORMANCE.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"conformance ground truth not found at {path} (set MDETR_AGF_CONFORMANCE to its folder)")
    return path


def stand_in_weights():
    """The conformance folder's ``weights.py``, imported as a plain file (never copied)."""
    spec = importlib.util.spec_from_file_location("conformance_weights", conformance_path("weights.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scene_logits(model, scene):
    """The model's class logits for a ShapesWorld scene: what must be identical before and after
    a call that hooks into (or fails inside) the model."""
    from mdetr_agf.images import prepare

    with torch.no_grad():
        return model(images=[prepare(scene.image, size=model.input_size)[0]], text=[scene.caption])["pred_logits"]


def write_zenodo_checkpoint(family, path, *, ema=False):
    """A file laid out like the published ones: model, args (a Namespace), optimizer, epoch."""
    manifest = json.loads(conformance_path("mdetr", f"{family}.manifest.json").read_text())
    args = json.loads(conformance_path("mdetr", "args.json").read_text())[family]
    state = stand_in_weights().make_state_dict([(k, s) for k, s, _ in manifest])
    checkpoint = {"model": state, "args": argparse.Namespace(**args), "epoch": 7,
                  "optimizer": {"state": {0: {"step": torch.tensor(10.0)}}, "param_groups": [{"lr": 1e-4}]}}
    if ema:
        checkpoint["model_ema"] = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="session")
def toy():
    """The bundled toy model: real trained weights, offline."""
    from mdetr_agf import load_model

    return load_model("toy")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty download cache of the test's own."""
    monkeypatch.setenv("MDETR_AGF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


CAPTIONS = ["a red circle left of a blue square", "the small green triangle", "a large yellow star"]


@pytest.fixture(scope="session")
def small_model():
    """A tiny MDETR with a locally trained tokenizer; every query grounds caption tokens 2 and 3."""
    torch.manual_seed(0)
    tokenizer = train_tokenizer(CAPTIONS * 4, vocab_size=300)  # small: words split into pieces
    config = ModelConfig(backbone="small_cnn", num_queries=5, hidden_dim=32, nheads=4, enc_layers=1, dec_layers=1,
                         dim_feedforward=64, text_config=TextConfig(vocab_size=len(tokenizer), hidden_size=32,
                                                                    num_hidden_layers=1, num_attention_heads=4,
                                                                    intermediate_size=64, max_position_embeddings=300))
    model = build_model(config)
    model.tokenizer = tokenizer
    # Make every query ground caption tokens 2 and 3 with certainty, and be an object.
    with torch.no_grad():
        model.class_embed.weight.zero_()
        model.class_embed.bias.fill_(-20.0)
        model.class_embed.bias[[2, 3]] = 10.0
    return model
