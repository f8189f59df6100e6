"""The package's shape: modules and functions small enough to read, a generic attribution core
that knows no MDETR, ``mdetr_agf.explain`` a plain function that takes rules, tape notes that are
declared, and hook order that cannot matter.
"""
import ast
import functools
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mdetr_agf
from mdetr_agf.attribution.core.engine import Tape
from mdetr_agf.attribution.core.rules import AGFOptions, ZRule
from mdetr_agf.attribution.mdetr.capture import Capture
from mdetr_agf.attribution.mdetr.placement import agf_composite
from mdetr_agf.attribution.mdetr.rules import AbsoluteSum, clear_start, start_total
from mdetr_agf.attribution.mdetr.targets import QueryTokenTarget
from mdetr_agf.errors import InputError, InputTypeError
from mdetr_agf.images import prepare
from mdetr_agf.ops import Add
from mdetr_agf.shapesworld import make_scene

PACKAGE = Path(mdetr_agf.__file__).parent
CORE = PACKAGE / "attribution" / "core"
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 80


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_and_functions_stay_small(path):
    source = path.read_text()
    assert len(source.splitlines()) <= MAX_MODULE_LINES, f"{path.name}: split it by concept"
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path.name}: {', '.join(long)}"


def _imports(path):
    """Absolute module names a file imports (relative imports resolved against its package)."""
    package = "mdetr_agf." + ".".join(path.relative_to(CORE.parents[1]).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            found.append(".".join(base + ([node.module] if node.module else [])))
    return found


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_the_generic_core_imports_nothing_mdetr_specific(path):
    for name in _imports(path):
        assert not name.startswith(("mdetr_agf.models", "mdetr_agf.attribution.mdetr", "mdetr_agf.explanation",
                                    "timm", "transformers")), f"{path.name} imports {name}"


def test_importing_the_core_loads_no_model_code():
    code = ("import sys, mdetr_agf.attribution.core; "
            "print(sorted(m for m in sys.modules if m.startswith(('mdetr_agf.models', 'timm', 'transformers'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_explain_is_a_plain_function_that_takes_rules():
    assert inspect.isfunction(mdetr_agf.explain)
    parameters = inspect.signature(mdetr_agf.explain).parameters
    assert {"composite", "options", "score", "method", "target"} <= set(parameters)
    assert mdetr_agf.explain.__module__ == "mdetr_agf.explanation"


@pytest.fixture(scope="module")
def scene():
    return make_scene(1_000_002)


def test_explain_uses_the_composite_and_options_it_is_given(toy, scene):
    plain = mdetr_agf.explain(toy, scene.image, scene.caption, method="agf")
    target = plain.target
    again = mdetr_agf.explain(toy, scene.image, scene.caption, target=target, composite=agf_composite)
    assert torch.equal(plain.image, again.image)
    calls = []

    def signed_sums(model, heads, options):  # the transformers' sums by the signed z-rule
        calls.append(options)
        return agf_composite(model, heads, options, type_rules=[(Add, ZRule)])

    swapped = mdetr_agf.explain(toy, scene.image, scene.caption, target=target, composite=signed_sums)
    assert len(calls) == 1 and isinstance(calls[0], AGFOptions)
    assert not torch.allclose(plain.tokens, swapped.tokens, atol=1e-6)
    ablated = mdetr_agf.explain(toy, scene.image, scene.caption, target=target, options=AGFOptions(no_a=True))
    assert not torch.allclose(plain.image, ablated.image, atol=1e-6 * float(plain.image.abs().max()))


@pytest.mark.parametrize("kwargs, error", [
    ({"method": "gae", "composite": agf_composite}, InputError),
    ({"method": "gradcam", "options": AGFOptions()}, InputError),
    ({"composite": "agf"}, InputTypeError),
    ({"options": {"no_a": True}}, InputTypeError),
])
def test_rules_for_other_methods_or_of_the_wrong_kind_are_refused(toy, scene, kwargs, error):
    with pytest.raises(error):
        mdetr_agf.explain(toy, scene.image, scene.caption, **kwargs)


def _token_relevance(model, scene, capture_first):
    """Token relevance of one AGF stream with Capture entered before or after the composite."""
    pixels = prepare(scene.image, size=model.input_size)[0][None].requires_grad_(True)
    ids = model.get_tokenizer()([scene.caption], return_tensors="pt")
    text = {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]}
    target = QueryTokenTarget(3, (8,))
    composite, capture = agf_composite(model, target.heads(model)), Capture(model)
    first, second = (capture, composite.context(model)) if capture_first else (composite.context(model), capture)
    model.eval()
    with torch.enable_grad(), first as a, second as b:
        tape, cap = (b, a) if capture_first else (a, b)
        out = model(images=pixels, text=text)
        score = target(out)
        inputs = [pixels, cap.embeddings]
        tape.gradient(score, inputs)
        assert "start_relevance" not in tape.notes  # notes are written by the relevance stream only
        relevance = tape.relevance(score, inputs, retain=True)
        total = start_total(tape)
        clear_start(tape)
        assert start_total(tape) is None and total is not None
        return relevance[1].detach()


def test_capture_and_composite_may_be_entered_in_either_order(toy, scene):
    after = _token_relevance(toy, scene, capture_first=False)
    before = _token_relevance(toy, scene, capture_first=True)
    assert after.abs().sum() > 0
    assert torch.equal(after, before)


def test_tape_notes_are_declared_and_cleared():
    tape = Tape()
    assert tape.notes == {}
    tape.notes["start_relevance"] = {1: torch.tensor(1.0)}
    tape.close()
    assert tape.notes == {}


def test_absolute_sum_is_the_default_on_the_transformers_sums(toy):
    composite = agf_composite(toy, ["class_embed"])
    rules = composite.rules(toy)
    sums = [rule for name, (module, rule) in rules.items() if isinstance(module, Add) and "transformer" in name]
    assert sums and all(isinstance(rule, AbsoluteSum) for rule in sums)


def test_the_swapped_composite_is_a_partial_too(toy, scene):
    swapped = functools.partial(agf_composite, type_rules=[(Add, ZRule)])
    e = mdetr_agf.explain(toy, scene.image, scene.caption, composite=swapped)
    assert torch.isfinite(e.image).all() and e.tokens.abs().sum() > 0
