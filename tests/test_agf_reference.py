"""AGF reproduces the authors' reference code, and explaining leaves the model as it was.

Ground truth: `shared/conformance/agf/` (beside the checkout, or $MDETR_AGF_CONFORMANCE): for
ResNet-18/50, VGG-16 and VGG-19-BN with stand-in weights, the reference's maps for eight cases
(the arg-max class, class 7, and the six ablations). Each map must lie within 1e-3 of the
reference and correlate with it at 0.9999 or better.
"""
import importlib.util
import json
import os
import weakref
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from mdetr_agf.errors import InputError
from mdetr_agf.attribution import Composite, Pass, Rule, ZRule, explain_classifier, torchvision_agf
from mdetr_agf.attribution.core.engine import hooked
from mdetr_agf.ops import Add, MatMul

CONFORMANCE = Path(os.environ.get("MDETR_AGF_CONFORMANCE",
                                  Path(__file__).resolve().parents[1].parent / "shared" / "conformance"))
ARCHS = ["resnet18", "resnet50", "vgg16", "vgg19_bn"]
CASES = ["top", "class7", "no_fx", "no_fdx", "no_m", "no_reg", "no_a", "gradcam"]


def _required(*parts):
    path = CONFORMANCE.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"AGF ground truth not found at {path} (set MDETR_AGF_CONFORMANCE to the conformance folder)")
    return path


@lru_cache(maxsize=1)  # one architecture at a time: VGG weights are large
def _reference(arch):
    spec = importlib.util.spec_from_file_location("conformance_weights", _required("weights.py"))
    weights = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(weights)
    manifest = json.loads(_required("agf", f"{arch}.manifest.json").read_text())
    model = getattr(torchvision.models, arch)(weights=None)
    model.load_state_dict(weights.make_state_dict([(key, shape) for key, shape, *_ in manifest]))
    fixture = dict(np.load(_required("agf", f"{arch}.npz")))
    cases = dict(json.loads(_required("agf", "cases.json").read_text()))
    return model.eval(), fixture, cases


@pytest.fixture
def two_threads():
    """The ground truth was recorded with 2 CPU threads; other counts change the order of float
    sums, and AGF (like the reference itself) turns that into map differences of up to ~1e-3."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("arch", ARCHS)
def test_map_matches_reference(arch, case, two_threads):
    model, fixture, cases = _reference(arch)
    images = torch.from_numpy(fixture["input"])
    with torch.no_grad():
        np.testing.assert_allclose(model(images).numpy(), fixture["logits"], atol=1e-4, rtol=0)

    options = dict(cases[case])
    cam = explain_classifier(model, images, options.pop("class_id", None), **options).numpy()

    expected = fixture[f"cam_{case}"]
    assert cam.shape == expected.shape
    assert np.abs(cam - expected).max() <= 1e-3
    assert np.corrcoef(cam.ravel(), expected.ravel())[0, 1] >= 0.9999


# ---------------------------------------------------------------- the model is left as it was


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _snapshot(model):
    return {
        "hooks": len(hooked(model)),
        "modules": [name for name, _ in model.named_modules()],
        "inplace": [m.inplace for m in model.modules() if hasattr(m, "inplace")],
        "instance_forward": [m for m in model.modules() if "forward" in m.__dict__],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def _assert_unchanged(model, before, images, logits):
    after = _snapshot(model)
    assert after["hooks"] == 0 and hooked(model) == []
    assert after["modules"] == before["modules"] and after["inplace"] == before["inplace"]
    assert after["instance_forward"] == []
    assert all(torch.equal(before["state"][k], v) for k, v in after["state"].items())
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(images), logits)


def test_model_unchanged_after_explaining(resnet, images):
    before = _snapshot(resnet)
    with torch.no_grad():
        logits = resnet(images)
    cam = explain_classifier(resnet, images)
    assert cam.shape == (2, 1, 32, 32) and torch.isfinite(cam).all()
    _assert_unchanged(resnet, before, images, logits)


def test_hooks_removed_when_an_exception_escapes(resnet, images):
    before = _snapshot(resnet)
    with torch.no_grad():
        logits = resnet(images)
    with pytest.raises(KeyError):
        with torchvision_agf().context(resnet):
            assert len(hooked(resnet)) > 0 and hasattr(resnet.layer1[0], "residual_add")
            resnet(images)
            raise KeyError("mid-way")
    _assert_unchanged(resnet, before, images, logits)

    with pytest.raises(RuntimeError):  # the model itself fails inside the context
        explain_classifier(resnet, images[:, :1])
    _assert_unchanged(resnet, before, images, logits)

    class Failing(Rule):
        def relevance(self, record, relevance):
            raise ArithmeticError("in the relevance pass")

    failing = torchvision_agf()
    failing.type_map.insert(0, (nn.MaxPool2d, Failing))
    with pytest.raises(ArithmeticError):
        explain_classifier(resnet, images, composite=failing)
    _assert_unchanged(resnet, before, images, logits)


def test_explaining_frees_the_recorded_graph(resnet, images):
    outputs = []

    class Spy(ZRule):  # on the residual sums: fenced, so their records sit on autograd nodes
        def relevance(self, record, relevance):
            outputs.append(weakref.ref(record.inputs[0]))
            return super().relevance(record, relevance)

    spying = torchvision_agf()
    spying.type_map.insert(0, (Add, Spy))
    explain_classifier(resnet, images, composite=spying)
    assert len(outputs) == 8 and all(ref() is None for ref in outputs)


def test_outside_the_passes_gradients_are_plain(resnet, images):
    x = images.clone().requires_grad_()
    with torchvision_agf().context(resnet):
        inside = resnet(x)
        (g_inside,) = torch.autograd.grad(inside[:, 1].sum(), x, retain_graph=True)
    (g_after,) = torch.autograd.grad(inside[:, 1].sum(), x)  # the graph outlives the hooks
    (g_plain,) = torch.autograd.grad(resnet(x)[:, 1].sum(), x)
    torch.testing.assert_close(g_inside, g_plain)
    torch.testing.assert_close(g_after, g_plain)


def test_deterministic(resnet, images):
    assert torch.equal(explain_classifier(resnet, images, [3, 4]), explain_classifier(resnet, images, [3, 4]))


def test_class_ids_are_checked(resnet, images):
    with pytest.raises(InputError):
        explain_classifier(resnet, images, [1, 2, 3])
    with pytest.raises(InputError):
        explain_classifier(resnet, images, 10)
    with pytest.raises(InputError):
        explain_classifier(resnet, images, composite=torchvision_agf(), no_a=True)
    assert torch.equal(explain_classifier(resnet, images, 4), explain_classifier(resnet, images, [4, 4]))


# ---------------------------------------------------------------- the engine beyond CNNs


class _Attention(nn.Module):
    """Q·Kᵀ with Q and K from the same tokens: a multi-input module whose inputs depend on each other."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.qk = nn.Linear(4, 4), nn.Linear(4, 4), MatMul()
        self.residual = Add()

    def forward(self, x):
        scores = self.qk(self.q(x), self.k(x).transpose(-1, -2))
        return self.residual(scores.flatten(1), x.flatten(1).repeat(1, 3)[:, :9])


def test_multi_input_rules_see_only_their_own_module():
    torch.manual_seed(0)
    model, x = _Attention(), torch.randn(2, 3, 4, requires_grad=True)
    seen = {}

    class Spy(ZRule):
        def relevance(self, record, relevance):
            out = super().relevance(record, relevance)
            inputs = tuple(t.detach() for t in record.inputs)  # records are cleared on leaving the context
            seen[type(self.module).__name__] = (inputs, relevance, out)
            return out

    composite = Composite(type_map=[((MatMul, Add), Spy), (nn.Linear, Pass)])
    with composite.context(model) as tape:
        y = model(x)
        seed = torch.randn_like(y)
        tape.gradient(y.sum(), x)
        (r_x,) = tape.relevance(y, x, seed)

    (q, kt), r, (r_q, r_kt) = seen["MatMul"]
    s = r / (q @ kt + 1e-9)
    torch.testing.assert_close(r_q, q * (s @ kt.transpose(-1, -2)))  # z-rule, local Jacobian only
    torch.testing.assert_close(r_kt, kt * (q.transpose(-1, -2) @ s))
    # plain tensor ops (transpose, flatten, repeat, slicing) move relevance without loss
    total = r_q.sum() + r_kt.sum() + seen["Add"][2][1].sum()
    torch.testing.assert_close(r_x.sum(), total, rtol=1e-4, atol=1e-5)
    assert hooked(model) == []
