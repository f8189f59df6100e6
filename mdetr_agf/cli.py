"""``mdetr-agf`` / ``python -m mdetr_agf``: the package's jobs from a shell.

Building the parser imports nothing heavy (no torch, timm, transformers): ``--help``, ``--version``
and ``models`` answer at once, and each command imports what it needs when it runs.
"""
import argparse
import os
import re
import sys
from pathlib import Path

from . import __version__
from .demo import DEMO_SEED
from .errors import DownloadError, InputError, MdetrAgfError
from .project import HOME

#: The names of ``mdetr_agf.METHODS``, here so that parsing needs no torch (a test keeps them equal).
METHOD_NAMES = ("agf", "gae", "rollout", "raw_attention", "gradcam", "grad_x_input")
#: The names of ``attribution.mdetr.SCORES``, for the same reason.
SCORE_NAMES = ("logit", "softmax", "agf")
TOY_HINT = "`--model toy` runs the bundled toy model, which needs no network"


def figure_path(out):
    """Where a figure will be written: a format matplotlib writes, PNG when no extension is given
    (the path printed is then the one written, ``name.png``)."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = Path(out).suffix.lower().lstrip(".")
    if not suffix:
        return f"{out}.png"
    if suffix not in formats:
        raise InputError(f"--out {out!r}: cannot write .{suffix} figures; use one of "
                         f"{', '.join('.' + f for f in sorted(formats))}")
    return out


def note(message):
    print(f"mdetr-agf: {message}", file=sys.stderr)


def cmd_models(args):
    from . import hub

    cache = hub.cache_dir(create=False)  # listing needs no folder, nor a writable one
    rows = [("name", "architecture", "task", "size", "metric", "cached")]
    for name, entry in hub.registry().items():
        metric = entry.metric
        path = cache / entry.file
        cached = ("bundled" if entry.url is None else "yes" if path.is_file()
                  else "weights" if hub.checkpoint.slim_path(path).is_file() else "")
        rows.append((name, entry.architecture, entry.task, entry.size,
                     f"{metric.get('value', '')} {metric.get('name', '')}".strip(), cached))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    print(f"\ncache: {cache}")
    return 0


def cmd_download(args):
    from . import hub

    print(hub.resolve(args.name, full_download=args.full))
    return 0


def warn_unknown_words(model_name, caption):
    """The toy model knows only ShapesWorld's words; say which words of ``caption`` it has never seen."""
    from . import hub

    if hub.get_entry(model_name).architecture != "toy":
        return
    from .shapesworld import vocabulary

    known = set(vocabulary())
    unknown = [w for w in dict.fromkeys(re.findall(r"[a-z]+", caption.lower())) if w not in known]
    if unknown:
        note(f"warning: the toy model knows only ShapesWorld's words ({', '.join(vocabulary())}); "
             f"{', '.join(map(repr, unknown))} {'is' if len(unknown) == 1 else 'are'} not among them, "
             f"so what it says about {'it' if len(unknown) == 1 else 'them'} means nothing")


def load(args):
    from .models import load_model

    return load_model(args.model, checkpoint=args.checkpoint, device=args.device, tokenizer=args.tokenizer)


def cmd_detect(args):
    import json

    from .images import load_image
    from .prediction import predict

    out = figure_path(args.out) if args.out else None
    warn_unknown_words(args.model, args.caption)
    model = load(args)
    image = load_image(args.image)  # a URL is fetched once, not by every step
    result = predict(model, image, args.caption, threshold=args.threshold)
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
    if out:
        from .plot import plot_detections

        plot_detections(result, image, save=out)
        print(f"wrote {out}")
    return 0


def versus_choice(value):
    """``--versus``: a query when it is a whole number, else a phrase of the caption."""
    if value is None:
        return None
    return int(value) if value.strip().isdigit() else value


def cmd_explain(args):
    from .explanation import explain
    from .images import load_image
    from .plot import plot_explanation
    from .prediction import predict

    out = figure_path(args.out)
    warn_unknown_words(args.model, args.caption)
    model = load(args)
    image = load_image(args.image)  # a URL is fetched once, not by every step
    prediction = predict(model, image, args.caption)
    expl = explain(model, image, args.caption, query=args.query, phrase=args.phrase, method=args.method,
                   versus=versus_choice(args.versus), score=args.score)
    print(f"{expl.method}: {expl.target}" + (f" (score: {expl.score})" if expl.score else ""))
    for token, value in zip(expl.token_strings, expl.tokens.tolist()):
        print(f"  {token!r:>14} {value:+.4f}")
    plot_explanation(expl, image, prediction=prediction, save=out)
    print(f"wrote {out}")
    return 0


def cmd_evaluate(args):
    from .distributed import join, leave
    from .errors import UnknownNameError
    from .evaluate import evaluate, write_json
    from .models import load_model

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise InputError(f"--methods {args.methods!r} names no method: give a comma-separated list from "
                         f"{', '.join(METHOD_NAMES)}")
    if args.n < 1:
        raise InputError(f"--n must be at least 1 (the number of scenes to score), got {args.n}")
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown:
        raise UnknownNameError(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(METHOD_NAMES)}")
    group = join(args.device)  # under torchrun: this process's share of the scenes, on its own device
    memory = None if args.perturbation_memory is None else int(args.perturbation_memory * 2**30)
    try:
        results = evaluate(load_model(args.model, device=group.device), methods, n=args.n, seed=args.seed,
                           score=args.score, group=group, journal=args.journal, memory=memory,
                           progress=not args.no_progress, confusable=args.confusable)
    finally:
        leave(group)
    if results is None:  # not rank 0: rank 0 reports for the whole job
        return 0
    print("target scores: " + ", ".join(f"{m} {s or '(none: attention only)'}"
                                        for m, s in results["target_scores"].items()))
    print(f"detection accuracy@IoU0.5: {results['detection']['accuracy_iou50']:.3f} "
          f"({results['detection']['n']} phrases)")
    keys = list(next(iter(results["methods"].values())))
    widths = [max(15, len(k) + 2) for k in keys]
    for title, table in (("all phrases", results["methods"]),
                         ("phrases whose box is right", results["methods_when_detected"])):
        print(f"\n{title}:")
        print("method".ljust(14) + "".join(k.rjust(w) for k, w in zip(keys, widths)))
        for method, scores in table.items():
            print(method.ljust(14) + "".join(("-" if scores[k] is None else f"{scores[k]:.3f}").rjust(w)
                                             for k, w in zip(keys, widths)))
    if args.json:
        write_json(results, args.json)
        print(f"wrote {args.json}")
    return 0


def cmd_demo(args):
    from . import hub
    from .demo import offline, run_demo

    out = figure_path(args.out)
    hub.get_entry(args.model)  # an unknown name fails here, listing the known ones
    name = args.model
    if name != "toy" and offline():
        why = ("MDETR_AGF_OFFLINE is set" if os.environ.get("MDETR_AGF_OFFLINE", "").strip()
               else "zenodo.org cannot be reached")
        note(f"offline ({why}): the demo runs on the bundled toy model and a ShapesWorld scene instead of "
             f"{name!r}; connect to the internet (and leave MDETR_AGF_OFFLINE unset or 0) to use {name!r}")
        name = "toy"
    out = run_demo(name, out=out, seed=args.seed)
    print(f"wrote {out}")
    return 0


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default: a value as ``(default: X)``; an option without one says in its help what happens."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def _model_options(s, default):
    s.add_argument("--model", default=default, help="a name of `mdetr-agf models`")
    s.add_argument("--checkpoint", help="a local Zenodo-format file instead of downloading "
                                        "(default: the model's file, downloaded once into the cache)")
    s.add_argument("--tokenizer", help="a local tokenizer folder (tokenizer.json, or vocab.json and merges.txt) "
                                       "(default: the one the model names, from the Hugging Face hub)")
    s.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")


def parser():
    p = argparse.ArgumentParser(prog="mdetr-agf", formatter_class=_Help,
                                description="MDETR grounding and its AGF explanations.", epilog=f"home: {HOME}")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="command")

    def command(name, run, help):
        s = sub.add_parser(name, help=help, description=help, formatter_class=_Help)
        s.set_defaults(run=run)
        return s

    command("models", cmd_models, "list the registry: sizes, metrics, what is cached")
    s = command("download", cmd_download, "download a checkpoint's weights into the cache")
    s.add_argument("name", help="a name of `mdetr-agf models`")
    s.add_argument("--full", action="store_true",
                   help="keep the whole file (optimizer state included), not only the weights")

    s = command("detect", cmd_detect, "boxes for the phrases of a caption")
    s.add_argument("image", help="a file path or an http(s) URL")
    s.add_argument("caption")
    _model_options(s, "mdetr_resnet101")
    s.add_argument("--threshold", type=float, default=0.7, help="lowest score a detection is kept at")
    s.add_argument("--json", help="write the detections as JSON here (default: not written)")
    s.add_argument("--out", help="write a figure (PNG or PDF) here (default: no figure)")

    s = command("explain", cmd_explain, "a heatmap over the pixels and words for one grounding")
    s.add_argument("image", help="a file path or an http(s) URL")
    s.add_argument("caption")
    group = s.add_mutually_exclusive_group()
    group.add_argument("--query", type=int, help="the detection slot to explain (default: the best detection)")
    group.add_argument("--phrase", help="a phrase of the caption to explain (default: the best detection's)")
    s.add_argument("--versus", metavar="QUERY|PHRASE",
                   help="explain why this box and not another: a query number (the same phrase, another box) "
                        "or another phrase of the caption (the same box); the map is signed (default: no contrast)")
    s.add_argument("--method", default="agf", choices=METHOD_NAMES, help="explanation method")
    s.add_argument("--score", choices=SCORE_NAMES,
                   help="the scalar explained: logit, softmax or agf (default: the method's own; rollout and "
                        "raw_attention take none)")
    _model_options(s, "mdetr_resnet101")
    s.add_argument("--out", default="explanation.png", help="figure path (PNG or PDF)")

    s = command("evaluate", cmd_evaluate, "score explanation methods on ShapesWorld scenes with exact ground truth")
    s.add_argument("--model", default="toy", help="a name of `mdetr-agf models`")
    s.add_argument("--methods", default=",".join(METHOD_NAMES), help="comma-separated methods")
    # Option names that are no prefix of one of torchrun's (it parses the whole command line).
    s.add_argument("--scenes", "--n", dest="n", type=int, default=200,
                   help="number of scenes (under torchrun use --scenes: --n is ambiguous to torchrun)")
    s.add_argument("--seed", type=int, default=2_000_000, help="first scene seed (training used seeds < 100000)")
    s.add_argument("--score", choices=SCORE_NAMES,
                   help="one target score for every method that takes one (default: each method's own)")
    s.add_argument("--confusable", action="store_true",
                   help="scenes whose phrase would fit two objects but for its size word; adds the contrastive "
                        "specificity (why this object and not its twin)")
    s.add_argument("--json", help="write the results here (default: not written)")
    s.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun each rank takes GPU LOCAL_RANK)")
    s.add_argument("--journal", help="a JSON-lines file each scene's record is appended to; rerunning with the "
                   "same arguments skips the scenes it holds (default: none)")
    s.add_argument("--perturbation-memory", type=float, metavar="GIB",
                   help="memory the deletion/insertion forwards may use at once (default: 2 on the CPU, 4 on a GPU)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = command("demo", cmd_demo, "detect and explain on a ready example (the toy model needs no network)")
    s.add_argument("--model", default="toy", help="a name of `mdetr-agf models`; offline, the toy is used")
    s.add_argument("--seed", type=int, default=DEMO_SEED, help="ShapesWorld scene for the toy model")
    s.add_argument("--out", default="demo.png", help="figure path (PNG or PDF)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        code = args.run(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the try, not at interpreter exit
        return code
    except BrokenPipeError:
        # The reader (`| head`) has all it wanted: not an error. Point stdout at /dev/null so the
        # interpreter's final flush does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except DownloadError as exc:
        hint = "" if getattr(args, "model", "toy") == "toy" else f"; {TOY_HINT}"
        print(f"mdetr-agf: error: {exc}{hint}", file=sys.stderr)
        return 2
    except (MdetrAgfError, OSError) as exc:
        print(f"mdetr-agf: error: {exc}", file=sys.stderr)
        return 2
