"""torch.hub finds one entry point per registry name and returns ready models."""
import importlib.util
from pathlib import Path

import torch

from mdetr_agf import hub
from mdetr_agf.models.build import FAMILIES

REPO = Path(__file__).resolve().parents[1]


def hubconf():
    spec = importlib.util.spec_from_file_location("hubconf", REPO / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_registry_name_is_an_entry_point():
    module = hubconf()
    # what torch.hub.list reports: the public callables of hubconf.py
    names = {n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_")}
    assert set(hub.registry()) <= names
    assert "refcocog" in getattr(module, "mdetr_resnet101_refcocog").__doc__.lower()


def test_entry_point_builds_the_architecture_without_weights():
    model = torch.hub.load(str(REPO), "mdetr_clevr", source="local", pretrained=False, trust_repo=True)
    assert model.config == FAMILIES["mdetr_clevr"] and model.qa_dataset == "clevr"


def test_entry_point_passes_a_local_tokenizer_folder(tmp_path):
    from mdetr_agf import load_model

    bundled = load_model("toy").get_tokenizer()
    bundled.save_pretrained(str(tmp_path / "tokenizer"))
    model = torch.hub.load(str(REPO), "toy", source="local", trust_repo=True, tokenizer=str(tmp_path / "tokenizer"))
    assert model.get_tokenizer() is not bundled
    assert model.get_tokenizer().get_vocab() == bundled.get_vocab()
