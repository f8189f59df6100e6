"""Regenerate the figure gallery (docs/gallery/) and the README's teaser from the package itself.

    python scripts/make_figures.py [--out docs/gallery] [--conformance PATH]

On the bundled toy model and the demo's ShapesWorld scene (offline, deterministic):
``teaser.png``, ``demo.png``, ``comparison.png`` (every method, every panel scaled by the same
rule), ``tokens.png``; and ``contrast.png`` on a confusable scene (``CONTRAST_SEED``): why the
box for the phrase and not the box the model also put on the phrase's twin. The PhraseCut mask panel and the question-answering panel need full-size
MDETR models; without downloading gigabytes they are drawn on *stand-in* weights rebuilt from the
conformance fixtures (``$MDETR_AGF_CONFORMANCE``, ``weights.py`` + manifests): the layout and the
code path are real, the numbers are not trained. Where that folder is absent these two figures
are skipped, and the script says so.
"""
import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
TOY_FIGURES = ("teaser", "demo", "comparison", "tokens", "contrast")
#: A held-out confusable scene: "a small circle" next to a large circle of the same colour.
CONTRAST_SEED = 1_000_100
STAND_IN_FIGURES = ("phrasecut", "qa")
STAND_IN_NOTE = "stand-in weights (deterministic, untrained): the layout is real, the values are not"


def toy_figures(out, wanted=TOY_FIGURES):
    if not wanted:
        return
    from mdetr_agf import METHODS, load_model, plot
    from mdetr_agf.demo import DEMO_SEED, demo_figure, explain_detections
    from mdetr_agf.grounding import one_per_phrase
    from mdetr_agf.prediction import predict
    from mdetr_agf.shapesworld import make_scene

    model = load_model("toy")
    scene = make_scene(DEMO_SEED)
    prediction = predict(model, scene.image, scene.caption)
    shown = one_per_phrase(prediction.detections)
    maps = {m: explain_detections(model, scene.image, scene.caption, shown, m) for m in METHODS}
    first = maps["agf"][0]
    grid = [[maps[m][i] for m in METHODS] for i in range(len(shown))]
    draw = {"teaser": lambda: demo_figure(prediction, maps["agf"], scene.image, tokens=False),
            "demo": lambda: demo_figure(prediction, maps["agf"], scene.image, "toy"),
            "comparison": lambda: plot.plot_comparison(grid, scene.image),
            "tokens": lambda: plot.plot_tokens(first.token_strings, first.tokens.numpy(), values=True,
                                               title=f"AGF token relevance for “{first.phrase}”"),
            "contrast": lambda: contrast_figure(model)}
    for name in wanted:
        yield plot.save(draw[name](), out / f"{name}.png")


def contrast_explanation(model, scene, phrase):
    """AGF's contrast for ``phrase``: its box (the one ``explain`` picks for the phrase) against the
    box the model puts on the phrase's twin (the other circle), chosen as ``evaluate`` chooses it."""
    from mdetr_agf import explain
    from mdetr_agf.evaluate import versus_query
    from mdetr_agf.grounding import query_for_tokens
    from mdetr_agf.prediction import box_cxcywh_to_xyxy, predict
    from mdetr_agf.shapesworld import twin
    from mdetr_agf.text import phrase_tokens

    prediction = predict(model, scene.image, scene.caption)
    out, encoding = prediction.outputs, prediction.encoding
    tokens = phrase_tokens(encoding, scene.caption, phrase.text)
    here = query_for_tokens(out["pred_logits"][0], tokens, int(encoding["attention_mask"][0].sum()))
    boxes = box_cxcywh_to_xyxy(out["pred_boxes"][0].detach(), *prediction.image_size)
    there = versus_query(boxes, here, scene.objects[twin(scene, phrase.object_index)].box_xyxy)
    return explain(model, scene.image, scene.caption, phrase=phrase.text, versus=there)


def contrast_figure(model):
    """The contrast of ``CONTRAST_SEED``'s phrase against its twin's box (``contrast_explanation``)."""
    from mdetr_agf import plot
    from mdetr_agf.shapesworld import make_scene

    scene = make_scene(CONTRAST_SEED, confusable=True)
    return plot.plot_explanation(contrast_explanation(model, scene, scene.phrases[0]), scene.image)


def conformance_folder(path=None):
    folder = Path(path or os.environ.get("MDETR_AGF_CONFORMANCE") or REPO.parent / "shared" / "conformance")
    return folder if (folder / "weights.py").is_file() and (folder / "mdetr").is_dir() else None


def stand_in(family, folder, captions, input_size):
    """A full-size ``family`` model with the conformance stand-in weights and a tokenizer trained
    on ``captions`` (the RoBERTa vocabulary needs the network)."""
    from mdetr_agf.models.build import FAMILIES, build_model
    from mdetr_agf.text import train_tokenizer

    spec = importlib.util.spec_from_file_location("conformance_weights", folder / "weights.py")
    weights = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(weights)
    manifest = json.loads((folder / "mdetr" / f"{family}.manifest.json").read_text())
    model = build_model(FAMILIES[family])
    state = weights.make_state_dict([(k, s) for k, s, _ in manifest])
    model.load_state_dict({k: v for k, v in state.items() if not k.endswith("position_ids")})
    core = getattr(model, "detr", model)
    core.tokenizer = train_tokenizer(captions * 4, vocab_size=300)
    model.input_size = input_size  # small inputs keep the CPU run short
    return model.eval()


def stand_in_figures(out, folder, wanted=STAND_IN_FIGURES):
    from mdetr_agf.demo import DEMO_SEED
    from mdetr_agf.shapesworld import make_scene

    scene = make_scene(DEMO_SEED)
    if "phrasecut" in wanted:
        yield phrasecut_figure(out, folder, scene)
    if "qa" in wanted:
        yield qa_figure(out, folder, scene)


def phrasecut_figure(out, folder, scene):
    from matplotlib.figure import Figure

    from mdetr_agf import explain, plot
    from mdetr_agf.attribution import MaskTarget
    from mdetr_agf.prediction import predict

    caption = scene.phrases[0].text
    seg = stand_in("mdetr_efficientnetB3_phrasecut", folder, [caption], 320)
    prediction = predict(seg, scene.image, caption, threshold=0.0)
    prediction.detections = prediction.detections[:1]
    mask_map = explain(seg, scene.image, caption, target=[MaskTarget(prediction.detections[0].query)])[0]
    mask_map.phrase = caption
    fig = Figure(figsize=(10, 4.6), layout="constrained")
    left, right = fig.subfigures(1, 2)
    plot.plot_detections(prediction, scene.image, ax=left.add_subplot(), title=f"PhraseCut mask for “{caption}”")
    plot.draw_heatmap(right.add_subplot(), scene.image, mask_map.image, title=f"AGF for the mask of “{caption}”")
    fig.suptitle(STAND_IN_NOTE, fontsize=9)
    return plot.save(fig, out / "phrasecut.png")


def qa_figure(out, folder, scene):
    from matplotlib.figure import Figure

    import torch

    from mdetr_agf import explain, plot
    from mdetr_agf.answers import CLEVR_ATTRIBUTES
    from mdetr_agf.attribution import AnswerTarget
    from mdetr_agf.inputs import model_input

    question = "how many large circles are there"
    qa = stand_in("mdetr_clevr", folder, [question], 320)
    with torch.no_grad():
        pixels, _ = model_input(qa, scene.image)
        outputs = qa(images=[pixels], text=[question])
    kinds = ["yes/no", "attribute", "count"]
    scores = {"answer type": dict(zip(kinds, outputs["pred_answer_type"][0].softmax(-1).tolist())),
              "attribute": dict(zip(CLEVR_ATTRIBUTES, outputs["pred_answer_attr"][0].softmax(-1).tolist())),
              "count": {str(i): p for i, p in enumerate(outputs["pred_answer_reg"][0].softmax(-1).tolist())}}
    answer_map = explain(qa, scene.image, question, target=[AnswerTarget("type")])[0]
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=[2.4, 1])
    plot.plot_answer(scores, fig=left, title=f"“{question}?”")
    plot.draw_heatmap(right.add_subplot(), scene.image, answer_map.image, title="AGF for the answer type")
    fig.suptitle(STAND_IN_NOTE, fontsize=9)
    return plot.save(fig, out / "qa.png")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "gallery", help="folder (default docs/gallery)")
    parser.add_argument("--conformance", help="conformance fixtures folder (default $MDETR_AGF_CONFORMANCE)")
    parser.add_argument("--figures", default=",".join(TOY_FIGURES + STAND_IN_FIGURES),
                        help="comma-separated subset to write (default: all)")
    args = parser.parse_args(argv)
    wanted = [f.strip() for f in args.figures.split(",") if f.strip()]
    unknown = sorted(set(wanted) - set(TOY_FIGURES + STAND_IN_FIGURES))
    if unknown:
        parser.error(f"unknown figure(s) {', '.join(unknown)}; choose from {', '.join(TOY_FIGURES + STAND_IN_FIGURES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for path in toy_figures(args.out, [f for f in TOY_FIGURES if f in wanted]):
        print(f"wrote {path}", flush=True)
    folder = conformance_folder(args.conformance)
    stand_ins = [f for f in STAND_IN_FIGURES if f in wanted]
    if stand_ins and folder is None:
        print(f"skipped {' and '.join(f + '.png' for f in stand_ins)}: they are drawn on stand-in weights from the conformance "
              f"fixtures, not found at {args.conformance or os.environ.get('MDETR_AGF_CONFORMANCE') or REPO.parent / 'shared' / 'conformance'} "
              "(set MDETR_AGF_CONFORMANCE or pass --conformance to a folder with weights.py and mdetr/)", flush=True)
    elif stand_ins:
        for path in stand_in_figures(args.out, folder, stand_ins):
            print(f"wrote {path}", flush=True)
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
