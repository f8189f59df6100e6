"""What the explanation evaluation costs: the toy per scene, two torchrun processes against one,
and the stand-in ResNet-101 per expression at full size, extrapolated to 1,000 expressions.

    python benchmarks/bench_evaluate.py --json bench_evaluate.json            # the figures in docs/scaling.md
    python benchmarks/bench_evaluate.py --quick                               # a check that it runs (minutes)

1. ``toy``: the six methods on ShapesWorld scenes in this process, one torch thread: seconds a scene.
2. ``parallel``: ``mdetr-agf evaluate`` on the same scenes in one process and under
   ``torchrun --standalone --nproc_per_node=2`` (gloo), each one thread, wall time of the whole
   command (start-up included); the ratio is what two processes on two cores give.
3. ``r101``: MDETR-R101 with the conformance folder's stand-in weights (random ones without it:
   the time does not depend on the values) at 800 × 1066 px (320 × 426 under ``--quick``): one
   explanation per method, and the no-grad forward per perturbed image in the chunks the
   default memory budget allows; an expression costs its forward, the two ends its curves share
   (the unperturbed image and the baseline), six explanations and six deletion/insertion curves
   of 18 images each between those ends. Also the peak memory of a one-image no-grad
   forward, per pixel (what ``evaluate.FORWARD_BYTES_PER_PIXEL`` assumes).
"""
import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_agf import peak_above  # noqa: E402
from mdetr_agf import evaluate, load_model  # noqa: E402
from mdetr_agf import explain  # noqa: E402
from mdetr_agf.attribution.mdetr.targets import QueryTokenTarget  # noqa: E402
from mdetr_agf.models.build import FAMILIES, build_model  # noqa: E402

CURVE_IMAGES = 2 * (evaluate.STEPS - 1)  # a curve's images between its two ends, which a caption runs once


def bench_toy(scenes, seed):
    torch.set_num_threads(1)
    model = load_model("toy")
    evaluate.evaluate(model, n=1, seed=seed - 1, progress=False)  # warm-up
    start = time.perf_counter()
    phrases = evaluate.evaluate(model, n=scenes, seed=seed, progress=False)["detection"]["n"]
    seconds = time.perf_counter() - start
    return {"toy_scenes": scenes, "toy_s_per_scene": seconds / scenes,
            "toy_minutes_per_1000_phrases": 1000 * seconds / phrases / 60}


def wall(command):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def bench_parallel(scenes, seed):
    with tempfile.TemporaryDirectory() as tmp:
        args = ["-m", "mdetr_agf", "evaluate", "--scenes", str(scenes), "--seed", str(seed), "--no-progress"]
        one = wall([sys.executable, *args, "--json", f"{tmp}/one.json"])
        two = wall([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args,
                    "--json", f"{tmp}/two.json"])
        same = [json.loads(Path(f"{tmp}/{n}.json").read_text()) for n in ("one", "two")]
        for result in same:
            result.pop("world_size")
    return {"parallel_scenes": scenes, "one_process_s": one, "two_processes_s": two, "two_over_one": two / one,
            "same_json": same[0] == same[1]}


def stand_in_r101():
    """MDETR-R101 with the conformance stand-in weights, when the folder is there."""
    model = build_model(FAMILIES["mdetr_resnet101"]).eval()
    folder = Path(os.environ.get("MDETR_AGF_CONFORMANCE", ROOT.parent / "shared" / "conformance"))
    if not (folder / "weights.py").is_file():
        return model, "random"
    spec = importlib.util.spec_from_file_location("conformance_weights", folder / "weights.py")
    weights = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(weights)
    manifest = json.loads((folder / "mdetr" / "mdetr_resnet101.manifest.json").read_text())
    state = weights.make_state_dict([(k, s) for k, s, _ in manifest])
    model.load_state_dict({k: v for k, v in state.items() if not k.endswith("position_ids")})
    return model, "stand-in (conformance weights.py)"


def bench_r101(height, device):
    torch.manual_seed(0)
    model, weights = stand_in_r101()
    model.to(device)
    pixels = torch.randn(3, height, height * 4 // 3, device=device)
    ids = torch.tensor([[0, 102, 4758, 8, 10, 2335, 15, 10, 34141, 2]], device=device)
    text = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    target = QueryTokenTarget(0, (1, 2))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def forward(images):
        with torch.no_grad():
            model(images=images, text={k: v.expand(len(images), -1) for k, v in text.items()})

    forward(pixels[None])  # warm-up
    start = time.perf_counter()
    forward(pixels[None])
    sync()
    t_forward = time.perf_counter() - start
    peak = peak_above(lambda: forward(pixels[None]), device)[0]
    chunk = min(evaluate.perturbation_chunk(pixels), CURVE_IMAGES)
    start = time.perf_counter()
    evaluate.scores_on_images(model, text, lambda k: pixels, chunk, chunk, [target])  # as the curves run
    sync()
    t_image = (time.perf_counter() - start) / chunk
    per_method = {}
    for method in evaluate.METHODS:
        start = time.perf_counter()
        explain(model, pixels, text, target=target, method=method)
        sync()
        per_method[method] = time.perf_counter() - start + CURVE_IMAGES * t_image
    item = t_forward + 2 * t_image + sum(per_method.values())
    return {"r101_weights": weights, "r101_size": list(pixels.shape[1:]), "r101_forward_s": t_forward,
            "r101_forward_peak_bytes_per_pixel": peak / (pixels.shape[1] * pixels.shape[2]),
            "r101_chunk_images": chunk, "r101_perturbed_image_s": t_image,
            "r101_method_s_per_expression": per_method,
            "r101_hours_per_1000_expressions_by_method": {m: 1000 * s / 3600 for m, s in per_method.items()},
            "r101_s_per_expression": item, "r101_hours_per_1000_expressions": 1000 * item / 3600}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few scenes, 320 px: a check that it runs")
    p.add_argument("--toy-scenes", type=int)
    p.add_argument("--parallel-scenes", type=int)
    p.add_argument("--seed", type=int, default=2_000_000)
    p.add_argument("--device", default="cpu", help="for the R101 part")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out: toy, parallel, r101")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    skip = set(args.skip.split(","))
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "torch": torch.__version__, "quick": args.quick}
    if "toy" not in skip:
        result |= bench_toy(args.toy_scenes or (5 if args.quick else 20), args.seed)
        print(f"toy, six methods, one thread: {result['toy_s_per_scene']:.2f} s a scene", flush=True)
    if "parallel" not in skip:
        result |= bench_parallel(args.parallel_scenes or (16 if args.quick else 200), args.seed)
        print(f"{result['parallel_scenes']} scenes: one process {result['one_process_s']:.1f} s, two "
              f"{result['two_processes_s']:.1f} s (x{result['two_over_one']:.2f}); same JSON: {result['same_json']}",
              flush=True)
    if "r101" not in skip:
        result |= bench_r101(320 if args.quick else 800, torch.device(args.device))
        print(f"R101 {result['r101_size']}: {result['r101_s_per_expression']:.1f} s an expression (six methods), "
              f"{result['r101_hours_per_1000_expressions']:.1f} h per 1,000; per method: "
              + ", ".join(f"{m} {h:.2f} h" for m, h in result["r101_hours_per_1000_expressions_by_method"].items())
              + f"; forward peak {result['r101_forward_peak_bytes_per_pixel']:.0f} B/px", flush=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
