"""Where AGF's initial relevance ends up in MDETR: pixels, caption tokens, or absorbed.

    python benchmarks/agf_conservation.py [--families mdetr_resnet101 ...] [--query 3] [--json out.json]

Models: the conformance stand-in weights (`shared/conformance`, or $MDETR_AGF_CONFORMANCE) on the
fixture's image0 (3×96×128) and caption 0; ``toy``: the bundled trained toy model on ShapesWorld
scene 1000002. For each family, in float32 (what `explain` reports in
``extras["conservation"]``) and float64 (the same rules without rounding noise), the shares of the
start total (x ⊙ ∇x at the head) that reach the pixels and the tokens, and the absorbed rest.
``absorbed_*`` splits the absorbed part by stage: what enters a stage minus what leaves it (the
decoder: its zero target and query embeddings; the joint encoder and text encoder: position
encodings; the backbone: only the rules' 1e-9 stabilizers). ``mass`` is Σ|R| over |start|:
AGF's residual terms conserve the signed total only.
"""
import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mdetr_agf.attribution.mdetr.capture import Capture  # noqa: E402
from mdetr_agf.attribution.mdetr.placement import agf_composite  # noqa: E402
from mdetr_agf.attribution.mdetr.rules import start_total  # noqa: E402
from mdetr_agf.attribution.mdetr.targets import QueryTokenTarget  # noqa: E402
from mdetr_agf.models.build import FAMILIES, build_model  # noqa: E402

CONFORMANCE = Path(os.environ.get("MDETR_AGF_CONFORMANCE", REPO.parent / "shared" / "conformance"))


def stand_in(family):
    if family == "toy":  # the bundled trained toy model on a ShapesWorld scene: weights that were trained
        import mdetr_agf
        from mdetr_agf.images import prepare
        from mdetr_agf.shapesworld import make_scene

        model, scene = mdetr_agf.load_model("toy"), make_scene(1_000_002)
        ids = model.get_tokenizer()([scene.caption], return_tensors="pt")
        text = {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]}
        return model, prepare(scene.image, size=model.input_size)[0], text
    spec = importlib.util.spec_from_file_location("conformance_weights", CONFORMANCE / "weights.py")
    weights = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(weights)
    manifest = json.loads((CONFORMANCE / "mdetr" / f"{family}.manifest.json").read_text())
    state = weights.make_state_dict([(k, s) for k, s, _ in manifest])
    model = build_model(FAMILIES[family])
    model.load_state_dict({k: v for k, v in state.items() if not k.endswith("position_ids")})
    z = np.load(CONFORMANCE / "mdetr" / f"{family}.npz")
    text = {k: torch.from_numpy(z[k][:1]) for k in ("input_ids", "attention_mask")}
    return model, torch.from_numpy(z["image0"]), text


def shares(model, image, text, target, dtype):
    model = model.to(dtype)
    x = image[None].to(dtype).requires_grad_(True)
    tr, emb = model.transformer, model.transformer.text_encoder.embeddings
    watched = {"memory": tr.encoder, "text_resized": tr.resizer, "position": emb.position_embeddings,
               "type": emb.token_type_embeddings}
    seen, hooks = {}, []
    composite = agf_composite(model, target.heads(model))
    try:
        with torch.enable_grad(), composite.context(model) as tape, Capture(model) as cap:
            # registered after the composite's hooks: they see the outputs the relevance arrives at
            hooks = [m.register_forward_hook(lambda mod, a, out, k=k: seen.__setitem__(k, out))
                     for k, m in watched.items()]
            out = model(images=x, text=text)
            score = target(out)
            inputs = [x, cap.embeddings, cap.src] + [seen[k] for k in watched]
            tape.gradient(score, inputs)
            r = dict(zip(["pixels", "words", "grid", *watched], tape.relevance(score, inputs, retain=False)))
            start = float(start_total(tape))
    finally:
        for h in hooks:
            h.remove()
        model.float()
    real = text["attention_mask"][0].bool()
    total = {k: 0.0 if v is None else float(v.sum()) / start for k, v in r.items()}
    pixels, tokens = total["pixels"], float(r["words"][0, real].sum()) / start
    return {"start": start, "pixels": pixels, "tokens": tokens, "absorbed": 1 - pixels - tokens,
            # where the absorbed part stays, stage by stage (each: what enters minus what leaves)
            "absorbed_decoder": 1 - total["memory"],
            "absorbed_joint_encoder": total["memory"] - total["grid"] - total["text_resized"],
            "absorbed_backbone": total["grid"] - pixels,
            "absorbed_text_encoder": total["text_resized"] - total["words"] - total["position"] - total["type"],
            "absorbed_position_type_embeddings": total["position"] + total["type"],
            "absorbed_padding_tokens": total["words"] - tokens,
            "mass_pixels": float(r["pixels"].abs().sum()) / abs(start),
            "mass_tokens": float(r["words"][0, real].abs().sum()) / abs(start)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["mdetr_resnet101", "mdetr_efficientnetB3", "mdetr_clevr"])
    parser.add_argument("--query", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    results = {}
    for family in args.families:
        model, image, text = stand_in(family)
        with torch.no_grad():
            probs = model(images=image[None], text=text)["pred_logits"][0, args.query].softmax(-1)
        n = int(text["attention_mask"].sum())
        target = QueryTokenTarget(args.query, (int(probs[:n].argmax()),))
        results[family] = {"target": str(target)}
        for dtype in (torch.float32, torch.float64):
            r = shares(model, image, text, target, dtype)
            results[family][str(dtype).removeprefix("torch.")] = r
            print(f"{family:22s} {str(dtype):14s} " + " ".join(f"{k}={v:.4g}" for k, v in r.items()), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
