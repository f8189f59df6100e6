"""Train the toy MDETR bundled with the package (``load_model("toy")``) on ShapesWorld.

    python scripts/train_toy.py --processes 2 --steps 8400 --seed 0 --bf16 --backbone small_cnn_s16 \
        --enc-layers 3 --dec-layers 4 --all-objects 1 --text-pretrain 600 --text-lr-scale 0 \
        --attribute-loss 1 --val-every 1050 --update-registry

(the shipped model's command: 38 minutes on two CPU cores; docs/evaluation.md has its figures).
``--processes N`` starts the script again under torchrun, the same as
``torchrun --standalone --nproc_per_node=N scripts/train_toy.py ...`` (data-parallel with
DistributedDataParallel over gloo; every process ends with the same weights; process 0 writes).

Trains from a fixed seed on scenes with seeds in [0, 100000), writes
``<out>/model.safetensors`` (float32 weights) and ``<out>/tokenizer/`` (the trained
tokenizer), then prints referring-expression accuracy at IoU >= 0.5 on held-out scenes
(seeds from 1,000,000 on, never used for training), the file's size and its sha256 for the
``toy`` entry of checkpoints.json. ``--out`` defaults to ``mdetr_agf/assets/toy``.
"""
import argparse
import functools
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mdetr_agf import distributed, training  # noqa: E402


def save(result, out: Path) -> Path:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in result.model.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    config = result.model.config.to_dict()
    meta = {"format": "pt", "order": json.dumps(list(state)), "args": json.dumps(result.options),
            "config": json.dumps(config), "input_size": str(training.TOY_INPUT_SIZE)}
    path = out / "model.safetensors"
    save_file(state, str(path), metadata=meta)
    result.tokenizer.save_pretrained(str(out / "tokenizer"))
    return path


REGISTRY = ROOT / "checkpoints.json"
DESCRIPTION = ("A toy MDETR trained from scratch in minutes on two CPU cores on ShapesWorld, the package's "
               "synthetic grounding world (coloured shapes, captions with exact phrase boxes), with MDETR's "
               "objective (soft-token prediction, L1 + GIoU boxes, contrastive alignment) plus an auxiliary loss "
               "asking each matched query for its object's colour, shape and size. Bundled with the "
               "package, so prediction, explanations, the notebook and the tests run offline; it understands "
               "only ShapesWorld captions at 160 px. Rebuild it with scripts/train_toy.py.")


def registry_entry(path: Path, config: dict, accuracy: float, digest: str) -> dict:
    return {"name": "toy", "url": None, "file": "assets/toy/model.safetensors", "architecture": "toy",
            "task": "detection", "metric": {"name": "ShapesWorld held-out acc@IoU0.5", "value": round(100 * accuracy, 2)},
            "size": f"{path.stat().st_size / 1e6:.1f}MB", "sha256": digest, "input_size": training.TOY_INPUT_SIZE,
            "config": config, "description": DESCRIPTION}


def update_registry(entry: dict, registry: Path = REGISTRY) -> None:
    """Replace (or append) the toy entry in checkpoints.json, leaving every other line as it is."""
    import re

    text = registry.read_text(encoding="utf-8")
    lines = [f'      {json.dumps(k)}: {json.dumps(v)}' for k, v in entry.items()]
    block = "    {\n" + ",\n".join(lines) + "\n    }"
    pattern = re.compile(r'    \{\n      "name": "toy",\n.*?\n    \}', re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        end = text.index('\n  ],\n  "assets"')
        text = text[:end] + ",\n" + block + text[end:]
    json.loads(text)  # still valid
    registry.write_text(text, encoding="utf-8")


def log(message):
    print(message, flush=True)


def validate(seeds, step, model):
    """Validation accuracy during training (module level: it runs in the first training process)."""
    log(f"step {step}: validation accuracy@IoU0.5 {100 * training.accuracy_iou50(model, seeds):.1f}% "
        f"({len(seeds)} scenes from seed {seeds.start})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=11500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="images per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--processes", type=int, default=1,
                   help="data-parallel training processes, started with torchrun (one per core: 2 on two cores is "
                        "1.6x faster than 1)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (the scenes are drawn in a second thread, which keeps a second core busy; "
                        "on 2 cores, 2 torch threads were no faster, and 8x slower when other jobs ran)")
    p.add_argument("--out", type=Path, default=ROOT / "mdetr_agf" / "assets" / "toy")
    p.add_argument("--eval-scenes", type=int, default=2000, help="held-out scenes to evaluate on")
    p.add_argument("--clip", type=float, default=0.1, help="gradient-norm clipping (MDETR: 0.1)")
    p.add_argument("--captions", type=int, default=4, help="captions per image and step")
    p.add_argument("--backbone", default="small_cnn", choices=["small_cnn", "small_cnn_s16"],
                   help="toy backbone: stride 32 or stride 16")
    p.add_argument("--enc-layers", type=int, default=2, help="joint encoder layers")
    p.add_argument("--dec-layers", type=int, default=2, help="decoder layers")
    p.add_argument("--all-objects", type=int, default=0,
                   help="how many of the --captions per image name every object (dense alignment)")
    p.add_argument("--contrast", type=int, default=0,
                   help="how many of the --captions per image refer to objects whose shape repeats (colour/size contrast)")
    p.add_argument("--similar", type=float, default=0.0,
                   help="share of training scenes whose objects are drawn from one or two shapes (colour matters)")
    p.add_argument("--text-pretrain", type=int, default=0,
                   help="masked-LM steps for the text encoder before detection training (0: none)")
    p.add_argument("--text-lr-scale", type=float, default=1.0, help="text encoder lr / lr (MDETR: 0.5)")
    p.add_argument("--attribute-loss", type=float, default=0.0,
                   help="weight of an auxiliary loss naming each matched query's colour, shape, size (0: none)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward pass (CPUs with AVX512-BF16)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout while training (the model keeps 0.1)")
    p.add_argument("--val-every", type=int, default=500, help="validation accuracy every N steps (0: never)")
    p.add_argument("--val-scenes", type=int, default=200)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--checkpoint", type=Path, help="save the training state here every 500 steps; resume from it "
                   "when it exists (with the same options)")
    p.add_argument("--update-registry", action="store_true",
                   help="write the metric, size and sha256 into the toy entry of checkpoints.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    args = p.parse_args(argv)

    if args.processes > 1 and "WORLD_SIZE" not in os.environ:
        return _under_torchrun(args.processes, sys.argv[1:] if argv is None else argv)
    group = distributed.join("cpu")  # under torchrun: one data-parallel process of the job
    try:
        return _train(args, group)
    finally:
        distributed.leave(group)


def _under_torchrun(processes, argv):
    """This command again, in ``processes`` processes started by torchrun on this machine."""
    return subprocess.call(torchrun_command(processes, argv))


def torchrun_command(processes, argv):
    """``torchrun --standalone --nproc_per_node=processes`` on this script with ``argv`` less ``--processes``."""
    rest, skip = [], False
    for a in argv:
        if skip or a.startswith("--processes="):
            skip = False
            continue
        skip = a == "--processes"
        if not skip:
            rest.append(a)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            __file__, *rest]


def _train(args, group):
    torch.set_num_threads(args.threads)
    if group.main:
        print(f"training {args.steps} steps, batch {args.batch_size}, lr {args.lr}, seed {args.seed}, "
              f"{args.captions} caption(s) per image, {group.world_size} process(es) of {args.threads} thread(s); "
              f"scenes from seeds [0, {len(training.TRAIN_SEEDS)})", flush=True)
    val_seeds = range(training.VALIDATION_SEED_START, training.VALIDATION_SEED_START + args.val_scenes)

    started = time.perf_counter()
    config = training.TrainConfig(
        steps=args.steps, seed=args.seed, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
        clip_max_norm=args.clip, captions_per_image=args.captions, all_objects_captions=args.all_objects,
        contrast_captions=args.contrast, similar_scenes=args.similar, backbone=args.backbone,
        enc_layers=args.enc_layers, dec_layers=args.dec_layers, text_pretrain_steps=args.text_pretrain,
        text_lr_scale=args.text_lr_scale, attribute_loss=args.attribute_loss, bf16=args.bf16, dropout=args.dropout,
        threads=args.threads, processes=group.world_size)
    result = training.train(config, progress=not args.no_progress, log_every=args.log_every, log=log,
                            callback=functools.partial(validate, val_seeds), callback_every=args.val_every,
                            checkpoint=None if args.checkpoint is None else str(args.checkpoint))
    if not group.main:  # process 0 writes and reports for the whole job
        return 0
    minutes = (time.perf_counter() - started) / 60
    print(f"trained in {minutes:.1f} min wall in all (text pre-training and process start included; "
          f"detection training {result.seconds / 60:.1f} min)", flush=True)
    path = save(result, args.out)
    seeds = range(training.EVAL_SEED_START, training.EVAL_SEED_START + args.eval_scenes)
    started = time.perf_counter()
    report = training.grounding_accuracy(result.model, seeds, result.tokenizer)
    print(f"held-out accuracy@IoU0.5: {100 * report['accuracy']:.2f}% of {report['phrases']} phrases in "
          f"{report['scenes']} scenes (seeds {seeds.start}..{seeds.stop - 1}); mean IoU {report['mean_iou']:.3f} "
          f"[{time.perf_counter() - started:.0f} s]")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, sha256 {digest}) and {args.out / 'tokenizer'}")
    if args.update_registry:
        update_registry(registry_entry(path, result.model.config.to_dict(), report["accuracy"], digest))
        print(f"updated the toy entry of {REGISTRY}")
    print(json.dumps({"accuracy": report["accuracy"], "phrases": report["phrases"], "scenes": report["scenes"],
                      "mean_iou": report["mean_iou"], "sha256": digest, "bytes": path.stat().st_size,
                      "minutes": minutes, "options": result.options}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
