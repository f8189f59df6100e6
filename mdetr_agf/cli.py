"""``mdetr-agf`` / ``python -m mdetr_agf``: the package's jobs from a shell."""
import argparse
import json
import sys

from . import hub
from .demo import DEMO_SEED
from .errors import MdetrAgfError


def cmd_models(args):
    cache = hub.cache_dir()
    rows = [("name", "architecture", "task", "size", "metric", "cached")]
    for name, entry in hub.registry().items():
        metric = entry.get("metric") or {}
        cached = "bundled" if entry.get("url") is None else ("yes" if (cache / entry["file"]).is_file() else "")
        rows.append((name, entry["architecture"], entry["task"], entry.get("size", ""),
                     f"{metric.get('value', '')} {metric.get('name', '')}".strip(), cached))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    print(f"\ncache: {cache}")
    return 0


def cmd_download(args):
    print(hub.resolve(args.name))
    return 0


def cmd_detect(args):
    from .models import load_model
    from .prediction import predict

    model = load_model(args.model, checkpoint=args.checkpoint, device=args.device)
    result = predict(model, args.image, args.caption, threshold=args.threshold)
    for d in result.detections:
        box = ", ".join(f"{v:.1f}" for v in d.box)
        print(f"query {d.query:3d}  score {d.score:.3f}  box [{box}]  phrase {d.phrase!r}")
    if result.answer is not None:
        print(f"answer: {result.answer}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"caption": result.caption, "answer": result.answer,
                       "detections": [{"query": d.query, "score": d.score, "box": d.box, "spans": d.spans,
                                       "phrase": d.phrase} for d in result.detections]}, f, indent=2)
    if args.out:
        from .plot import plot_detections

        plot_detections(result, args.image, save=args.out)
        print(f"wrote {args.out}")
    return 0


def cmd_explain(args):
    from .explain import explain
    from .models import load_model
    from .plot import plot_explanation
    from .prediction import predict

    model = load_model(args.model, checkpoint=args.checkpoint, device=args.device)
    prediction = predict(model, args.image, args.caption)
    expl = explain(model, args.image, args.caption, query=args.query, phrase=args.phrase, method=args.method)
    print(f"{expl.method}: {expl.target}")
    for token, value in zip(expl.token_strings, expl.tokens.tolist()):
        print(f"  {token!r:>14} {value:+.4f}")
    out = args.out or "explanation.png"
    plot_explanation(expl, args.image, prediction=prediction, save=out)
    print(f"wrote {out}")
    return 0


def cmd_evaluate(args):
    from .evaluate import evaluate, write_json
    from .models import load_model

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    from .explain.methods import METHODS

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        from .errors import UnknownNameError

        raise UnknownNameError(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(METHODS)}")
    results = evaluate(load_model(args.model), methods, n=args.n, seed=args.seed)
    print(f"detection accuracy@IoU0.5: {results['detection']['accuracy_iou50']:.3f} "
          f"({results['detection']['n']} phrases)")
    keys = list(next(iter(results["methods"].values())))
    for title, table in (("all phrases", results["methods"]),
                         ("phrases whose box is right", results["methods_when_detected"])):
        print(f"\n{title}:")
        print("method".ljust(14) + "".join(k.rjust(15) for k in keys))
        for method, scores in table.items():
            print(method.ljust(14) + "".join(("-" if scores[k] is None else f"{scores[k]:.3f}").rjust(15)
                                             for k in keys))
    if args.json:
        write_json(results, args.json)
        print(f"wrote {args.json}")
    return 0


def cmd_demo(args):
    from .demo import run_demo

    out = run_demo(args.model, out=args.out, seed=args.seed)
    print(f"wrote {out}")
    return 0


def parser():
    p = argparse.ArgumentParser(prog="mdetr-agf", description="MDETR grounding and its AGF explanations.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("models", help="list the registry: sizes, metrics, what is cached")
    s.set_defaults(run=cmd_models)
    s = sub.add_parser("download", help="download a checkpoint into the cache")
    s.add_argument("name")
    s.set_defaults(run=cmd_download)
    s = sub.add_parser("detect", help="boxes for the phrases of a caption")
    s.add_argument("image")
    s.add_argument("caption")
    s.add_argument("--model", default="mdetr_resnet101")
    s.add_argument("--checkpoint", help="a local Zenodo-format file instead of downloading")
    s.add_argument("--device")
    s.add_argument("--threshold", type=float, default=0.7)
    s.add_argument("--json", help="write the detections as JSON here")
    s.add_argument("--out", help="write a figure (PNG or PDF) here")
    s.set_defaults(run=cmd_detect)

    from .explain.methods import METHODS

    s = sub.add_parser("explain", help="a heatmap over the pixels and words for one grounding")
    s.add_argument("image")
    s.add_argument("caption")
    group = s.add_mutually_exclusive_group()
    group.add_argument("--query", type=int, help="the detection slot to explain (default: the best)")
    group.add_argument("--phrase", help="a phrase of the caption to explain")
    s.add_argument("--method", default="agf", choices=list(METHODS))
    s.add_argument("--model", default="mdetr_resnet101")
    s.add_argument("--checkpoint", help="a local Zenodo-format file instead of downloading")
    s.add_argument("--device")
    s.add_argument("--out", help="figure path (PNG or PDF; default explanation.png)")
    s.set_defaults(run=cmd_explain)

    s = sub.add_parser("evaluate", help="score explanation methods on ShapesWorld scenes with exact ground truth")
    s.add_argument("--model", default="toy")
    s.add_argument("--methods", default=",".join(METHODS))
    s.add_argument("--n", type=int, default=200, help="number of scenes")
    s.add_argument("--seed", type=int, default=2_000_000, help="first scene seed (training used seeds < 100000)")
    s.add_argument("--json", help="write the results here")
    s.set_defaults(run=cmd_evaluate)

    s = sub.add_parser("demo", help="detect and explain on a ready example (offline: toy model, ShapesWorld)")
    s.add_argument("--model", default=None, help="a registry name (default: toy, which needs no network)")
    s.add_argument("--seed", type=int, default=DEMO_SEED, help="ShapesWorld scene for the toy model")
    s.add_argument("--out", default="demo.png")
    s.set_defaults(run=cmd_demo)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except (MdetrAgfError, OSError) as exc:
        print(f"mdetr-agf: error: {exc}", file=sys.stderr)
        return 2
