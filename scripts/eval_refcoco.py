"""Score explanations on real referring expressions: RefCOCO / RefCOCO+ / RefCOCOg validation.

    python scripts/eval_refcoco.py --images COCO/train2014 --model mdetr_resnet101_refcoco \
        --dataset refcoco --expressions 500 --device cuda --json refcoco_val.json

or, sharing the expressions between 8 GPUs (docs/scaling.md: several machines, resuming):

    torchrun --standalone --nproc_per_node=8 scripts/eval_refcoco.py --images COCO/train2014 \
        --dataset refcoco --expressions 100000 --device cuda --journal refcoco.jsonl --json refcoco_val.json

The same metrics as ``mdetr-agf evaluate`` on ShapesWorld (``mdetr_agf/evaluate.py``), with
the ground truth of MDETR's published annotations: for each expression the referred object's
box and, where the annotation has COCO polygons, its mask (otherwise the box stands in for the
mask, and the JSON says how many did). Specificity pairs each expression with another
expression of the same COCO image that refers to a different object.

Needs: the COCO train2014 images (RefCOCO's images are all from it), the model's weights
(downloaded from Zenodo on first use, or ``--checkpoint FILE``), and the annotations, which are
taken from MDETR's ``mdetr_annotations.tar.gz`` (downloaded and extracted on first use) unless
``--annotations FILE`` names ``final_<dataset>_val.json``. Six methods on 500 expressions take
about an hour on one GPU; on a CPU use a small ``--expressions``.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mdetr_agf import METHODS, distributed, evaluate, hub, load_model  # noqa: E402
from mdetr_agf.errors import InputError  # noqa: E402

DATASETS = ("refcoco", "refcoco+", "refcocog")


def polygon_mask(segmentation, width, height):
    """A COCO polygon list as a bool mask; None for RLE or missing segmentations."""
    if not isinstance(segmentation, list) or not segmentation:
        return None
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in segmentation:
        if len(polygon) >= 6:
            draw.polygon([(polygon[i], polygon[i + 1]) for i in range(0, len(polygon) - 1, 2)], fill=1)
    mask = np.asarray(canvas, dtype=bool)
    return mask if mask.any() else None


def object_mask(record, width, height):
    """(mask, whether the box stood in): the annotation's polygons, else its box."""
    mask = polygon_mask(record["segmentation"], width, height)
    if mask is None:
        return evaluate.box_mask((height, width), record["box"]), True
    return mask, False


def expressions(annotations: dict) -> list[dict]:
    """One record per expression: file, caption, phrase span, box (xyxy), segmentation, COCO ids."""
    by_image = defaultdict(list)
    for ann in annotations["annotations"]:
        by_image[ann["image_id"]].append(ann)
    records = []
    for image in annotations["images"]:
        anns = by_image.get(image["id"], [])
        if not anns:
            continue
        ann = anns[0]  # a referring expression has exactly one referred object
        spans = image.get("tokens_positive_eval") or [ann.get("tokens_positive") or [[0, len(image["caption"])]]]
        start, end = spans[0][0][0], spans[0][-1][1]
        x, y, w, h = ann["bbox"]
        records.append({"file_name": image["file_name"], "caption": image["caption"], "span": (start, end),
                        "box": (x, y, x + w, y + h), "segmentation": ann.get("segmentation"),
                        "coco_image": image.get("original_id", image["id"]), "object": ann.get("original_id", ann["id"]),
                        "width": image["width"], "height": image["height"]})
    return records


def arg_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=Path, required=True, help="folder with COCO train2014 images")
    p.add_argument("--dataset", choices=DATASETS, default="refcoco")
    p.add_argument("--annotations", type=Path, help="final_<dataset>_val.json (default: from MDETR's archive)")
    p.add_argument("--model", default="mdetr_resnet101_refcoco", help="a registry name (mdetr-agf models)")
    p.add_argument("--checkpoint", type=Path, help="a local Zenodo-format file for --model")
    p.add_argument("--methods", default=",".join(METHODS))
    # Option names that are no prefix of one of torchrun's (it parses the whole command line).
    p.add_argument("--expressions", "--n", dest="n", type=int, default=500,
                   help="expressions to score, the first ones of the split (under torchrun use --expressions)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun each rank takes GPU LOCAL_RANK)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--journal", type=Path, help="a JSON-lines file each expression's record is appended to; "
                   "rerunning with the same arguments skips the expressions it holds")
    p.add_argument("--perturbation-memory", type=float, metavar="GIB",
                   help="memory the deletion/insertion forwards may use at once (default: 2 on the CPU, 4 on a GPU)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None):
    args = arg_parser().parse_args(argv)

    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if not args.images.is_dir():
        raise SystemExit(f"{args.images} is not a folder; pass --images with COCO's train2014 images "
                         "(https://cocodataset.org/#download, '2014 Train images')")
    group = distributed.join(args.device)  # under torchrun: this process's share, on its own device
    try:
        return _score(args, methods, group)
    finally:
        distributed.leave(group)


def _score(args, methods, group):
    path = args.annotations or hub.resolve_asset(f"final_{args.dataset}_val",
                                                 progress=not args.no_progress and group.main)
    records = expressions(json.loads(Path(path).read_text()))[: args.n]
    if not records:
        raise SystemExit(f"{path} holds no referring expressions with an annotation")
    objects_of = defaultdict(dict)  # COCO image -> {object id: record}
    for r in records:
        objects_of[r["coco_image"]].setdefault(r["object"], r)

    model = load_model(args.model, checkpoint=args.checkpoint, device=group.device)
    memory = None if args.perturbation_memory is None else int(args.perturbation_memory * 2**30)

    def score(index, r):
        file = args.images / r["file_name"]
        if not file.is_file():
            raise SystemExit(f"{file} is missing: --images must be COCO's train2014 folder")
        image = Image.open(file).convert("RGB")
        width, height = image.size
        mask, from_box = object_mask(r, width, height)
        other = next((o for k, o in objects_of[r["coco_image"]].items() if k != r["object"]), None)
        other_mask = None if other is None else object_mask(other, width, height)[0]
        phrase = {"span": r["span"], "box": r["box"], "mask": mask, "other": other_mask}
        scores = evaluate.empty_scores(methods)
        try:
            hits = evaluate.score_caption(model, image, r["caption"], [phrase], methods, scores, memory=memory)
        except InputError as e:  # e.g. a caption longer than the text encoder takes
            print(f"skipped {r['file_name']} ({r['caption']!r}): {e}", file=sys.stderr)
            return {"hits": 0, "phrases": 0, "masks_from_boxes": 0, "scores": evaluate.empty_scores(methods)}
        return {"hits": hits, "phrases": 1, "masks_from_boxes": int(from_box), "scores": scores}

    header = {"job": f"{args.dataset} val", "annotations": str(path), "model": evaluate.model_digest(model),
              "methods": methods, "steps": evaluate.STEPS}
    done = distributed.run_items(group, records, score, header=header, journal=args.journal,
                                 progress=not args.no_progress, desc=f"{args.dataset} val")
    if done is None:  # not rank 0: rank 0 reports for the whole job
        return None
    scores, hits, scored = evaluate.combine(done, methods)
    results = evaluate.summarize(scores, hits, scored, data={
        "dataset": args.dataset, "split": "val", "annotations": str(path), "model": args.model,
        "expressions": len(records), "skipped": len(records) - scored,
        "masks_from_boxes": sum(d["masks_from_boxes"] for d in done)}, world_size=group.world_size)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return results


if __name__ == "__main__":
    main()
