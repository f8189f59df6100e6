"""AGF on MDETR pinned: recorded maps that a changed rule cannot pass, and the stage-by-stage
conservation that docs/agf_rules.md tabulates.

The pinned maps were recorded with the rules of docs/agf_rules.md (``MKL_CBWR=COMPATIBLE python tests/test_agf_pinned.py``
writes them again, for a deliberate change of a rule). Each check first shows that the pin can fail:
swapping one rule (the transformers' sums from ``AbsoluteSum`` to the signed z-rule) moves the map
far outside the tolerance.
"""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mdetr_agf
from mdetr_agf.attribution.core.rules import ZRule
from mdetr_agf.attribution.mdetr.placement import agf_composite
from mdetr_agf.attribution.mdetr.targets import QueryTokenTarget
from mdetr_agf.ops import Add

from conftest import conformance_path, stand_in_weights

HERE = Path(__file__).parent
PINNED = HERE / "data" / "agf_pinned_maps.json"
BENCHMARKS = HERE.parent / "benchmarks" / "agf_conservation.py"
# Of each map's largest |value|. The stand-in R101's pixel map is a sum of large terms of either
# sign (its relevance mass is ~1e9 times the start, docs/agf_rules.md), so which convolution kernel
# the CPU library picks in a process moves it by up to ~6e-5; a changed rule moves it by ~60x its
# maximum, which either tolerance catches.
TOLERANCE = {"toy": 1e-5, "mdetr_resnet101": 1e-3}


def _toy_case():
    from mdetr_agf.shapesworld import make_scene

    model, scene = mdetr_agf.load_model("toy"), make_scene(1_000_002)
    return model, scene.image, scene.caption, QueryTokenTarget(3, (3,))


def _r101_case():
    import numpy as np

    from mdetr_agf.models.build import FAMILIES, build_model

    weights = stand_in_weights()  # skips, saying why, without the conformance data
    manifest = json.loads(conformance_path("mdetr", "mdetr_resnet101.manifest.json").read_text())
    state = weights.make_state_dict([(k, s) for k, s, _ in manifest])
    model = build_model(FAMILIES["mdetr_resnet101"])
    model.load_state_dict({k: v for k, v in state.items() if not k.endswith("position_ids")})
    z = np.load(conformance_path("mdetr", "mdetr_resnet101.npz"))
    text = {k: torch.from_numpy(z[k][:1]) for k in ("input_ids", "attention_mask")}
    return model.eval(), torch.from_numpy(z["image0"]), text, QueryTokenTarget(3, (5,))


CASES = {"toy": _toy_case, "mdetr_resnet101": _r101_case}


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _maps(case, composite=None):
    model, image, text, target = CASES[case]()
    e = mdetr_agf.explain(model, image, text, target=target, composite=composite)
    pooled = F.avg_pool2d(e.input_map[None, None], 4)[0, 0]  # 4x4 blocks: small enough to keep in the repo
    return {"pixels": pooled, "tokens": e.tokens, "grid": e.grid}


def _worst(maps, pinned):
    """Largest deviation from the pin, as a share of each map's largest |value|."""
    worst = 0.0
    for key, recorded in pinned.items():
        recorded = torch.tensor(recorded)
        assert maps[key].shape == recorded.shape, key
        worst = max(worst, float((maps[key] - recorded).abs().max() / recorded.abs().max()))
    return worst


@pytest.mark.parametrize("case", list(CASES))
def test_agf_maps_equal_the_pinned_ones(case):
    pinned = json.loads(PINNED.read_text())[case]
    swapped = _maps(case, composite=lambda m, heads, options: agf_composite(m, heads, options,
                                                                             type_rules=[(Add, ZRule)]))
    assert _worst(swapped, pinned) > 100 * TOLERANCE[case]  # the pin would catch this rule swap
    assert _worst(_maps(case), pinned) <= TOLERANCE[case]


@pytest.mark.parametrize("case, expected", [
    # docs/agf_rules.md, the float64 rows of the conservation table
    ("toy", {"tokens": 0.133, "absorbed_decoder": 0.165, "absorbed_position_type_embeddings": 0.255}),
    ("mdetr_resnet101", {"tokens": 0.0069, "absorbed_decoder": 0.613, "absorbed_position_type_embeddings": 0.015}),
])
def test_conservation_by_stage_as_documented(case, expected):
    bench = _load(BENCHMARKS, "agf_conservation")
    if case == "toy":
        model, image, text = bench.stand_in("toy")
        target = QueryTokenTarget(3, (3,))
    else:
        model, image, text, target = _r101_case()
    shares = bench.shares(model, image, text, target, torch.float64)
    # the transformers' rules conserve: only position encodings and stabilizers absorb (< 1e-7 of the start)
    assert abs(shares["absorbed_joint_encoder"]) < 1e-7
    assert abs(shares["absorbed_text_encoder"]) < 1e-7
    assert shares["absorbed_padding_tokens"] == 0  # the caption has no padding
    # every sum in the transformers shares by |contribution|: the token relevance has one sign
    assert shares["mass_tokens"] == pytest.approx(abs(shares["tokens"]), rel=1e-9)
    for key, value in expected.items():
        assert shares[key] == pytest.approx(value, rel=0.02, abs=2e-4), key


def _record():
    """Write the pinned maps anew (after a deliberate change of a rule)."""
    PINNED.write_text(json.dumps({case: {k: v.tolist() for k, v in _maps(case).items()} for case in CASES}))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    torch.set_num_threads(1)
    _record()
