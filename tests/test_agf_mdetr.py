"""AGF through the whole of MDETR: every module of every family has a rule, the MDETR rules
conserve relevance, and on full-size models with the stand-in weights the maps reach both the
pixels and the caption tokens, depend on the target, repeat bit for bit, and leave the model as it was.
"""
import json

import numpy as np
import pytest
import torch
from torch import nn

import mdetr_agf
from mdetr_agf.errors import InputError, InputTypeError
from mdetr_agf.attribution.core import engine
from mdetr_agf.attribution.core.engine import Record, Tape
from mdetr_agf.attribution.mdetr.placement import agf_composite, containers
from mdetr_agf.attribution.mdetr.rules import (AbsoluteSum, AttentionMix, AttributionShift, Bilinear, ProjectFlat,
                                          SamePadding, ZBoxSame)
from mdetr_agf.attribution.core.rules import AGF, Flat, ZBox, ZRule, safe_divide
from mdetr_agf.attribution.mdetr.targets import AnswerTarget, MaskTarget, QueryTokenTarget
from mdetr_agf.models.build import FAMILIES, build_model
from mdetr_agf.ops import Add, MatMul, Project
from mdetr_agf.training import toy_config

from conftest import conformance_path, stand_in_weights

from mdetr_agf.attribution.core.engine import hooked  # noqa: E402


def _heads(config):
    if config.masks:
        return ["detr.class_embed", "mask_head.out_lay"]
    return ["class_embed"] + (["answer_type_head"] if config.qa_dataset else [])


# ---------------------------------------------------------------- placement: every module has a rule

CONFIGS = {**FAMILIES, "toy": toy_config(vocab_size=50, tokenizer=None)}


@pytest.mark.parametrize("family", list(CONFIGS))
def test_every_module_of_every_family_has_a_rule(family):
    config = CONFIGS[family]
    with torch.device("meta"):  # the structure is all a placement needs
        model = build_model(config)
    composite = agf_composite(model, _heads(config))
    table = composite.table(model)  # raises if any module has neither a rule nor a container type
    with composite.context(model):  # canonized: the residual sums are modules too
        modules = dict(model.named_modules())
    kinds = containers()
    for name, module in modules.items():
        leaf = not any(True for _ in module.children())
        if leaf or isinstance(module, (Add, MatMul, Project)):
            assert name in table, f"{name} ({type(module).__name__}) has no rule"
        if name not in table:
            assert isinstance(module, kinds), f"{name} ({type(module).__name__}) is neither ruled nor a container"

    def rule(name):
        return table[name]

    detr = "detr." if config.masks else ""
    assert all(rule(h) == "Start" for h in _heads(config))
    tr = f"{detr}transformer"
    assert rule(f"{tr}.encoder.layers.0.self_attn.context") == "AttentionMix"
    assert rule(f"{tr}.encoder.layers.0.self_attn.scores") == "Bilinear(0.5)"
    assert rule(f"{tr}.decoder.layers.0.cross_attn_image.v_proj") == "ProjectFlat"
    assert rule(f"{tr}.decoder.layers.0.linear1") == "Flat"
    assert rule(f"{tr}.encoder.layers.0.add_attn") == "AbsoluteSum"
    assert rule(f"{tr}.decoder.layers.0.add_cross") == "AbsoluteSum"
    assert rule(f"{tr}.text_encoder.embeddings.add_position") == "AbsoluteSum"
    assert rule(f"{tr}.encoder.layers.0.norm1") == "Pass"
    assert rule(f"{tr}.text_encoder.encoder.layer.0.attention.self.context") == "AttentionMix"
    assert rule(f"{tr}.text_encoder.encoder.layer.0.attention.self.query") == "Flat"
    assert rule(f"{tr}.text_encoder.encoder.layer.0.intermediate.intermediate_act_fn") == "Pass"
    assert rule(f"{tr}.text_encoder.embeddings.word_embeddings") == "Terminal"
    assert rule(f"{tr}.resizer.fc") == "Flat"
    assert rule(f"{detr}input_proj") == "AttributionShift"
    body = f"{detr}backbone.0.body"
    if config.backbone.startswith("resnet"):
        assert rule(f"{body}.conv1") == "ZBox"
        block = "Bottleneck" if config.backbone == "resnet101" else "BasicBlock"
        main, flat = ("conv2", "conv1") if block == "Bottleneck" else ("conv1", "conv2")
        assert rule(f"{body}.layer1.0.{main}") == "AGF" and rule(f"{body}.layer1.0.{flat}") == "Flat"
        assert rule(f"{body}.layer2.0.downsample.0") == "Flat"
        assert rule(f"{body}.layer1.0.residual_add") == "ZRule"
    elif config.backbone.startswith("timm"):
        assert rule(f"{body}.conv_stem") == "ZBoxSame"
        assert rule(f"{body}.blocks.1.0.conv_dw") == "SamePadding(AGF)"  # stride 2: 'same' padding
        assert rule(f"{body}.blocks.1.1.conv_dw") == "AGF"
        assert rule(f"{body}.blocks.1.1.conv_pw") == "Flat" and rule(f"{body}.blocks.1.1.conv_pwl") == "Flat"
        assert rule(f"{body}.blocks.1.1.se") == "Pass" and rule(f"{body}.blocks.1.1.se.conv_reduce") == "Flat"
        assert rule(f"{body}.blocks.1.1.bn1") == "Pass" and rule(f"{body}.blocks.1.1.bn1.act") == "Pass"
        assert rule(f"{body}.blocks.1.1.residual_add") == "ZRule"
    else:
        assert rule(f"{body}.0") == "ZBox" and rule(f"{body}.2") == "AGF"
    if config.masks:
        assert rule("mask_head.lay1") == "AGF" and rule("mask_head.adapter1") == "Flat"
        assert rule("bbox_attention.scores") == "Bilinear(0.5)" and rule("bbox_attention.q_linear") == "Flat"
    assert not any(n.endswith("residual_add") for n, _ in model.named_modules()), "canonizers not undone"


def test_a_module_without_a_rule_is_refused():
    with torch.device("meta"):
        model = build_model(CONFIGS["toy"])
    model.backbone[0].body.append(nn.Hardswish())
    with pytest.raises(InputTypeError, match="no AGF rule.*Hardswish"):
        agf_composite(model, ["class_embed"]).table(model)
    # a user's type rule covers it
    table = agf_composite(model, ["class_embed"], type_rules=[(nn.Hardswish, Flat)]).table(model)
    assert table[f"backbone.0.body.{len(model.backbone[0].body) - 1}"] == "Flat"


def test_rules_are_swappable_and_heads_are_checked():
    with torch.device("meta"):
        model = build_model(CONFIGS["toy"])
    table = agf_composite(model, ["class_embed"], name_rules={"input_proj": AGF},
                            type_rules=[(nn.LayerNorm, Flat)]).table(model)
    assert table["input_proj"] == "AGF" and table["transformer.encoder.layers.0.norm1"] == "Flat"
    with pytest.raises(InputError, match="unknown head"):
        agf_composite(model, ["no_such_head"])


def test_efficientnet_canonizers_keep_the_outputs():
    torch.manual_seed(0)
    model = build_model(FAMILIES["mdetr_efficientnetB3"])
    x = torch.randn(1, 3, 64, 80)
    ids = torch.tensor([[0, 102, 4758, 2]])
    text = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        before = model(images=x, text=text)["pred_logits"]
        with agf_composite(model, ["class_embed"]).context(model):
            inside = model(images=x, text=text)["pred_logits"]
        after = model(images=x, text=text)["pred_logits"]
    assert torch.equal(before, inside) and torch.equal(before, after)
    assert not any(hasattr(m, "residual_add") for m in model.modules())


# ---------------------------------------------------------------- the MDETR rules conserve relevance


def _relevance(rule, module, inputs, relevance, output=None):
    """Run `rule` on one recorded call (float64), as the engine would in the relevance stream."""
    engine.remove_handles(rule.attach(module, Tape()))
    record = Record(len(inputs))
    record.inputs = tuple(inputs)
    record.output = module(*inputs) if output is None else output
    return rule.relevance(record, relevance)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)


def test_attention_rules_conserve(rng):
    a = torch.softmax(torch.randn(2, 4, 5, 7, generator=rng, dtype=torch.float64), -1).requires_grad_()
    v = torch.randn(2, 4, 7, 8, generator=rng, dtype=torch.float64).requires_grad_()
    r = torch.randn(2, 4, 5, 8, generator=rng, dtype=torch.float64)
    ra, rv = _relevance(AttentionMix(), MatMul(), [a, v], r)
    assert ra is None and torch.allclose(rv.sum(), r.sum())

    q, k = (torch.randn(2, 4, 5, 8, generator=rng, dtype=torch.float64).requires_grad_() for _ in range(2))
    kt = k.transpose(-2, -1)
    scores = MatMul(scale=8 ** -0.5)
    rs = torch.randn(2, 4, 5, 5, generator=rng, dtype=torch.float64)
    rq, rk = _relevance(Bilinear(), scores, [q, kt], rs)
    assert torch.allclose(rq.sum(), rs.sum() / 2) and torch.allclose(rk.sum(), rs.sum() / 2)
    assert _relevance(Bilinear(), scores, [q, kt], torch.zeros_like(rs)) == (None, None)


def test_absolute_sum_shares_by_absolute_contribution(rng):
    a = torch.tensor([[3.0, -1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[-1.0, 1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([[4.0, 2.0, 5.0]], dtype=torch.float64)
    ra, rb = _relevance(AbsoluteSum(), Add(), [a, b], r)
    # 3 + (-1) = 2: the signed z-rule would give 6 and -2; by |contribution| it is 3 and 1
    assert torch.allclose(ra, torch.tensor([[3.0, 1.0, 0.0]], dtype=torch.float64))
    assert torch.allclose(rb, torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64))  # nothing from 0 + 0
    x = torch.randn(2, 5, 6, generator=rng, dtype=torch.float64).requires_grad_()
    pos = torch.randn(1, 5, 6, generator=rng, dtype=torch.float64).requires_grad_()  # broadcast operand
    r = torch.randn(2, 5, 6, generator=rng, dtype=torch.float64)
    rx, rp = _relevance(AbsoluteSum(), Add(), [x, pos], r)
    assert rp.shape == pos.shape and torch.allclose(rx.sum() + rp.sum(), r.sum())
    assert torch.all(torch.sign(rx) * torch.sign(r) >= 0)  # each share keeps the sign of what arrives
    (only,) = _relevance(AbsoluteSum(), Add(), [x, pos.detach()], r)[:1]  # a constant operand absorbs nothing
    assert torch.allclose(only, r)


def test_attribution_shift_signs_the_map_around_its_mean_and_keeps_the_total(rng):
    conv = nn.Conv2d(4, 3, 1).double()
    x = torch.rand(1, 4, 5, 5, generator=rng, dtype=torch.float64).requires_grad_()
    r = torch.full((1, 3, 5, 5), 1e-3, dtype=torch.float64)
    r[..., 1:3, 2:4] = 5e-3  # where the transformer's attribution is: positive everywhere, higher here
    (got,) = _relevance(AttributionShift(), conv, [x], r)
    (flat,) = _relevance(Flat(), conv, [x], r)
    assert torch.all(flat >= 0) and torch.allclose(got.sum(), r.sum())
    spatial = got.sum(1)[0]
    assert torch.all(spatial[1:3, 2:4] > 0) and (spatial < 0).sum() >= 15  # the rest turns negative
    assert int(spatial.argmax()) // 5 in (1, 2) and int(spatial.argmax()) % 5 in (2, 3)


@pytest.mark.parametrize("kind", ["relu", "add", "add_broadcast"])
def test_zrule_written_out_gradients_equal_the_recorded_graph(rng, kind):
    """ZRule's direct ReLU and sum paths give bit for bit what differentiating the graph gives."""
    x = torch.randn(2, 5, 6, generator=rng).requires_grad_()
    if kind == "relu":
        module, inputs = nn.ReLU(), [x]
    else:
        other = torch.randn(1 if kind == "add_broadcast" else 2, 5, 6, generator=rng).requires_grad_()
        module, inputs = Add(), [x, other]
    r = torch.randn(2, 5, 6, generator=rng)
    r[0, 0] = 0
    out = module(*inputs)
    direct = _relevance(ZRule(), module, inputs, r, out)
    s = safe_divide(r, out.detach())
    grads = torch.autograd.grad(out, inputs, s)
    for got, t, g in zip(direct, inputs, grads):
        assert torch.equal(got, t.detach() * g)


def test_zero_relevance_is_not_shared(rng):
    """Where nothing arrives (the attention-score branch), the tape does not run the rule at all."""
    calls = []

    class Counting(Flat):
        def relevance(self, record, relevance):
            calls.append(relevance.abs().sum())
            return super().relevance(record, relevance)

    layer = nn.Linear(4, 3)
    x = torch.randn(2, 4, generator=rng).requires_grad_()
    tape = Tape()
    handles = Counting().attach(layer, tape)
    try:
        y = layer(x)
        assert tape.relevance(y, [x], [torch.zeros_like(y)]) == (None,) and calls == []
        (rx,) = tape.relevance(y, [x], [torch.ones_like(y)])
        assert len(calls) == 1 and rx.shape == x.shape and torch.isclose(rx.sum(), torch.tensor(6.0))
    finally:
        engine.remove_handles(handles)
        tape.close()


def test_project_flat_is_flat_with_the_passed_weight(rng):
    x = torch.randn(3, 6, 16, generator=rng, dtype=torch.float64).requires_grad_()
    linear = nn.Linear(16, 8).double()
    r = torch.randn(3, 6, 8, generator=rng, dtype=torch.float64)
    rx, rw, rb = _relevance(ProjectFlat(), Project(), [x, linear.weight, linear.bias], r)
    (expected,) = _relevance(Flat(), linear, [x], r)
    assert rw is None and rb is None and torch.allclose(rx, expected) and torch.allclose(rx.sum(), r.sum())


def _same_conv(stride=2, groups=1, channels=3):
    from timm.layers import Conv2dSame

    torch.manual_seed(0)
    return Conv2dSame(channels, 6 if groups == 1 else channels, 3, stride=stride, groups=groups).double()


@pytest.mark.parametrize("size", [(15, 20), (16, 21)])
def test_same_padding_rules_are_exact_on_the_image(size):
    conv = _same_conv()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    out = conv(x)
    r = torch.rand_like(out)
    (rx,) = _relevance(ZBoxSame(), conv, [x], r, out)
    assert rx.shape == x.shape and torch.allclose(rx.sum((1, 2, 3)), r.sum((1, 2, 3)))
    # where the padding is symmetric, an ordinary zero-padded conv with the same weight is ZBox's case
    plain = nn.Conv2d(3, 6, 3, stride=1, padding=1).double()
    plain.weight.data.copy_(conv.weight.data)
    same1 = _same_conv(stride=1)
    same1.weight.data.copy_(conv.weight.data)
    x1 = torch.randn(2, 3, *size, dtype=torch.float64)
    r1 = torch.rand_like(plain(x1))
    torch.testing.assert_close(_relevance(ZBoxSame(), same1, [x1], r1)[0], _relevance(ZBox(), plain, [x1], r1)[0])
    (rf,) = _relevance(SamePadding(Flat()), conv, [x], r, out)
    assert rf.shape == x.shape and torch.allclose(rf.sum(), r.sum())


def test_same_padding_agf_on_a_depthwise_conv():
    conv = _same_conv(groups=6, channels=6)
    x = torch.randn(1, 6, 16, 21, dtype=torch.float64).requires_grad_()
    rule = SamePadding(AGF())
    tape = Tape()
    handles = rule.attach(conv, tape)
    try:
        with torch.enable_grad():
            out = conv(x)
            score = (out * torch.randn_like(out)).sum()
            tape.gradient(score, [x])
            (rx,) = tape.relevance(out, [x], [torch.rand_like(out)])
    finally:
        engine.remove_handles(handles)
        tape.close()
    assert rx.shape == x.shape and torch.isfinite(rx).all() and rx.abs().sum() > 0


# ---------------------------------------------------------------- full-size models, stand-in weights


@pytest.fixture(scope="module", params=["mdetr_resnet101", "mdetr_efficientnetB3", "mdetr_clevr"])
def loaded(request):
    family = request.param
    manifest = json.loads(conformance_path("mdetr", f"{family}.manifest.json").read_text())
    state = stand_in_weights().make_state_dict([(k, s) for k, s, _ in manifest])
    model = build_model(FAMILIES[family])
    model.load_state_dict({k: v for k, v in state.items() if not k.endswith("position_ids")})
    z = np.load(conformance_path("mdetr", f"{family}.npz"))
    text = {k: torch.from_numpy(z[k][:1]) for k in ("input_ids", "attention_mask")}
    return family, model, torch.from_numpy(z["image0"]), text


def _outputs(model, image, text):
    with torch.no_grad():
        return model(images=image[None], text=text)


def test_agf_on_full_models(loaded):
    family, model, image, text = loaded
    before, hooks = _outputs(model, image, text), len(hooked(model))
    n_tokens = int(text["attention_mask"].sum())

    e = mdetr_agf.explain(model, image, text, query=3, method="agf")
    assert tuple(e.image.shape) == tuple(image.shape[-2:]) and torch.isfinite(e.image).all()
    assert e.image.std() > 0, "constant map"
    assert e.tokens.shape == (n_tokens,) and torch.isfinite(e.tokens).all()
    assert e.image.abs().sum() > 0 and e.tokens.abs().sum() > 0, "relevance must reach pixels and tokens"
    c = e.extras["conservation"]
    assert set(c) >= {"start", "pixels", "tokens", "absorbed"} and all(np.isfinite(v) for v in c.values())
    assert c["start"] != 0

    # one more call, three targets over one forward: the first repeats the call above bit for bit
    tokens = tuple(e.target.tokens)
    other_token = next(t for t in range(1, n_tokens - 1) if t not in tokens)
    targets = [QueryTokenTarget(3, tokens), QueryTokenTarget(7, tokens), QueryTokenTarget(3, (other_token,))]
    again, other_query, other_tok = mdetr_agf.explain(model, image, text, target=targets, method="agf")
    assert torch.equal(again.image, e.image) and torch.equal(again.tokens, e.tokens), "not deterministic"
    assert again.extras == e.extras
    assert not torch.allclose(other_query.image, e.image), "another query should give another map"
    assert not torch.allclose(other_tok.image, e.image), "another token should give another map"
    assert not torch.allclose(other_tok.tokens, e.tokens)

    after = _outputs(model, image, text)
    assert all(torch.equal(before[k], after[k]) for k in before) and len(hooked(model)) == hooks


def test_agf_answer_heads_of_clevr(loaded):
    family, model, image, text = loaded
    if family != "mdetr_clevr":
        pytest.skip("QA heads: CLEVR only")
    maps = mdetr_agf.explain(model, image, text, target=[AnswerTarget("type"), AnswerTarget("reg")], method="agf")
    for e in maps:
        assert torch.isfinite(e.image).all() and e.image.std() > 0 and e.tokens.abs().sum() > 0
        assert np.isfinite(e.extras["conservation"]["pixels"])
    assert not torch.allclose(maps[0].image, maps[1].image)


# ---------------------------------------------------------------- small models


def test_agf_on_random_toy_and_phrasecut_mask():
    torch.manual_seed(0)
    model = build_model(CONFIGS["toy"])
    image, ids = torch.randn(3, 64, 96), torch.tensor([[0, 5, 7, 9, 2]])
    text = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    e = mdetr_agf.explain(model, image, text, target=QueryTokenTarget(1, (2,)), method="agf")
    assert e.image.shape == (64, 96) and e.image.std() > 0 and e.tokens.abs().sum() > 0

    from dataclasses import replace

    config = replace(CONFIGS["toy"], masks=True, backbone="resnet18", contrastive_align=False, hidden_dim=128,
                     nheads=8)
    model = build_model(config)
    assert agf_composite(model, MaskTarget(1).heads(model)).table(model)["mask_head.out_lay"] == "Start"
    e = mdetr_agf.explain(model, image, text, target=MaskTarget(1), method="agf")
    assert torch.isfinite(e.image).all() and e.image.std() > 0 and e.tokens.abs().sum() > 0
