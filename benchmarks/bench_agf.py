"""AGF's cost against a plain forward+backward at MDETR's real input size, and cold checkpoint loads.

    python benchmarks/bench_agf.py [--quick] [--json bench.json] [--device cpu|cuda] [--ckpt PATH|make]

MDETR resizes every image to a shorter side of 800 px, so a 640×480 photo reaches the model as
800×1066: that is the default input (`--quick`: 512 px). Figures: torchvision ResNet-50 at 224 px;
MDETR-R101 and MDETR-EfficientNet-B3 (the conformance stand-in weights when $MDETR_AGF_CONFORMANCE
is set, else random ones: neither time nor memory depends on the values) — forward + backward of a
query/token score (weights' gradients included, as in training) against AGF and GAE for that
score; AGF for 8 targets of one image in one call against 8 calls (at 512 px); and a scaling row,
R101 at 320, 512 and 800 px.

Each figure runs in a fresh subprocess, so no figure inherits another's allocator state: the model
is loaded, then the first call gives the peak memory above the loaded model (CPU: the resident
set, exact from getrusage when the call sets the process's high-water mark, else sampled every
2 ms; CUDA: `max_memory_allocated`), and the median of `repeats` further calls the time.
Cold loads: a Zenodo-format file (model, model_ema, an Adam state per parameter, epoch, args —
about four times the weights) read the first time (which writes the slim safetensors copy)
against later loads of the slim copy.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mdetr_agf.models.build import FAMILIES, build_model  # noqa: E402

SHORT = {"mdetr_resnet101": "mdetr_r101", "mdetr_efficientnetB3": "mdetr_eb3"}
CONFORMANCE = Path(os.environ.get("MDETR_AGF_CONFORMANCE", REPO.parent / "shared" / "conformance"))
GIB = 2**30


# ---------------------------------------------------------------- one figure (in its own process)


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _high_water():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _settle():
    """Hand freed heap back to the system (glibc), so the baseline is what is really in use."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline may include freed heap
        pass


def peak_above(fn, device):
    """Bytes `fn()` needs at its peak above what was in use before it (see the module doc)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, torch.cuda.max_memory_allocated()
    import threading

    _settle()
    base, high_before, peak, done = _rss(), _high_water(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            done.wait(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    high = _high_water()
    top = high if high > high_before else max(peak[0], _rss())
    return top - base, top


def stand_in_model(family, device):
    """The family's model with the conformance stand-in weights, or random ones without them."""
    model = build_model(FAMILIES[family])
    manifest = CONFORMANCE / "mdetr" / f"{family}.manifest.json"
    weights = "random"
    if manifest.is_file() and (CONFORMANCE / "weights.py").is_file():
        import importlib.util

        spec = importlib.util.spec_from_file_location("conformance_weights", CONFORMANCE / "weights.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        state = module.make_state_dict([(k, s) for k, s, _ in json.loads(manifest.read_text())])
        model.load_state_dict({k: v for k, v in state.items() if not k.endswith("position_ids")})
        del state
        weights = "stand-in"
    return model.eval().to(device), weights


def _mdetr_calls(model, device, size):
    from mdetr_agf import explain
    from mdetr_agf.attribution.mdetr.targets import QueryTokenTarget

    image = torch.randn(3, size, size * 4 // 3, generator=torch.Generator().manual_seed(0)).to(device)
    ids = torch.tensor([[0, 102, 4758, 8, 10, 2335, 15, 10, 34141, 2]], device=device)
    text = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    target = QueryTokenTarget(3, (1, 2))
    targets = [QueryTokenTarget(q, (1 + q % 8,)) for q in range(8)]

    def fwd_bwd():
        out = model(images=image[None].requires_grad_(True), text=text)
        target(out).backward()
        model.zero_grad(set_to_none=True)

    return {
        "fwd_bwd": fwd_bwd,
        "agf": lambda: explain(model, image, text, target=target),
        "gae": lambda: explain(model, image, text, target=target, method="gae"),
        "agf_8_targets": lambda: explain(model, image, text, target=targets),
        "agf_8_singles": lambda: [explain(model, image, text, target=t) for t in targets],
    }


def _resnet50_calls(model, device):
    from mdetr_agf.attribution import explain_classifier

    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)

    def fwd_bwd():
        logits = model(x.detach().requires_grad_(True))
        logits[0, logits[0].argmax()].backward()
        model.zero_grad(set_to_none=True)

    return {"fwd_bwd": fwd_bwd, "agf": lambda: explain_classifier(model, x)}


def measure(family, figure, size, repeats, device):
    """One figure: {seconds, peak_gib (above the loaded model), resident_gib (whole process), ...}."""
    start_rss = _rss() if device.type == "cpu" else torch.cuda.memory_allocated()
    if family == "resnet50":
        import torchvision

        torch.manual_seed(0)
        model, weights = torchvision.models.resnet50(weights=None).eval().to(device), "random"
        fn = _resnet50_calls(model, device)[figure]
    else:
        model, weights = stand_in_model(family, device)
        fn = _mdetr_calls(model, device, size)[figure]
    _settle()
    model_bytes = (_rss() if device.type == "cpu" else torch.cuda.memory_allocated()) - start_rss
    above, top = peak_above(fn, device)  # the first call: also the warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times) if times else None, "peak_gib": above / GIB, "resident_gib": top / GIB,
            "model_gib": model_bytes / GIB, "weights": weights}


def run_figure(args, family, figure, size, repeats):
    """`measure` in a fresh interpreter; returns its result."""
    command = [sys.executable, __file__, "--figure", f"{family}:{figure}:{size}:{repeats}",
               "--device", args.device, "--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{family} {figure} at {size} px failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {family} {figure} {size} px: {result['seconds']:.2f} s, {result['peak_gib']:.2f} GiB above the model",
          file=sys.stderr, flush=True)
    return result


# ---------------------------------------------------------------- the whole benchmark


def _pair(prefix, plain, agf, gae=None):
    res = {f"{prefix}_fwd_bwd_s": plain["seconds"], f"{prefix}_agf_s": agf["seconds"],
           f"{prefix}_agf_over_fwd_bwd": agf["seconds"] / plain["seconds"],
           f"{prefix}_fwd_bwd_peak_gib": plain["peak_gib"], f"{prefix}_agf_peak_gib": agf["peak_gib"],
           f"{prefix}_agf_over_fwd_bwd_memory": agf["peak_gib"] / plain["peak_gib"],
           f"{prefix}_agf_resident_gib": agf["resident_gib"], f"{prefix}_model_gib": agf["model_gib"]}
    if gae is not None:
        res.update({f"{prefix}_gae_s": gae["seconds"], f"{prefix}_gae_peak_gib": gae["peak_gib"]})
    return res


def bench_models(args, size, repeats):
    results = {"input": [size, size * 4 // 3]}
    results.update(_pair("resnet50", run_figure(args, "resnet50", "fwd_bwd", 224, repeats),
                         run_figure(args, "resnet50", "agf", 224, repeats)))
    runs = {}
    for family, short in SHORT.items():
        runs[family] = {f: run_figure(args, family, f, size, repeats) for f in ("fwd_bwd", "agf", "gae")}
        results.update(_pair(short, runs[family]["fwd_bwd"], runs[family]["agf"], runs[family]["gae"]))
        results["weights"] = runs[family]["agf"]["weights"]

    scaling = []
    for s in args.scaling:
        r101 = runs["mdetr_resnet101"] if s == size else {
            f: run_figure(args, "mdetr_resnet101", f, s, repeats) for f in ("fwd_bwd", "agf")}
        row = _pair("r101", r101["fwd_bwd"], r101["agf"])
        scaling.append({"input": [s, s * 4 // 3], **{k.removeprefix("r101_"): v for k, v in row.items()}})
        if s == args.batched_size:
            single = r101["agf"]
    results["scaling_mdetr_r101"] = scaling

    b = args.batched_size
    if b not in args.scaling:
        single = run_figure(args, "mdetr_resnet101", "agf", b, repeats)
    few = max(1, repeats // 2)
    batched = run_figure(args, "mdetr_resnet101", "agf_8_targets", b, few)
    singles = run_figure(args, "mdetr_resnet101", "agf_8_singles", b, few)
    results.update({"batched_input": [b, b * 4 // 3], "agf_8_targets_one_call_s": batched["seconds"],
                    "agf_8_single_calls_s": singles["seconds"],
                    "batched8_over_8_singles": batched["seconds"] / singles["seconds"],
                    "agf_8_targets_peak_gib": batched["peak_gib"], "agf_single_target_peak_gib": single["peak_gib"],
                    "batched8_over_single_memory": batched["peak_gib"] / single["peak_gib"]})
    return results


def zenodo_file(path, family="mdetr_resnet101"):
    """A file laid out like the published ones, from random weights."""
    torch.manual_seed(0)
    state = build_model(FAMILIES[family]).state_dict()
    params = {i: {"step": torch.tensor(1000.0), "exp_avg": torch.randn_like(v), "exp_avg_sq": torch.rand_like(v)}
              for i, v in enumerate(state.values()) if v.is_floating_point()}
    torch.save({"model": state, "model_ema": {k: v.clone() for k, v in state.items()},
                "optimizer": {"state": params, "param_groups": [{"lr": 1e-4, "params": list(params)}]},
                "epoch": 40, "args": argparse.Namespace(backbone="resnet101", hidden_dim=256)}, path)
    return path


def bench_cold_load(ckpt):
    from mdetr_agf import hub

    ckpt = Path(ckpt)
    for slim in ckpt.parent.glob(ckpt.name + ".slim*"):
        slim.unlink()
    start = time.perf_counter()
    with torch.serialization.safe_globals([argparse.Namespace]):
        torch.load(ckpt, map_location="cpu", weights_only=True)
    unpickle = time.perf_counter() - start  # how upstream MDETR reads the file (all of it, into memory)
    start = time.perf_counter()
    hub.load_weights(ckpt)
    first = time.perf_counter() - start  # unpickle + write the slim copy
    slim = next(ckpt.parent.glob(ckpt.name + ".slim*.safetensors"))
    later = statistics.median(_time_load(ckpt) for _ in range(3))
    return {"checkpoint_bytes": ckpt.stat().st_size, "slim_bytes": slim.stat().st_size,
            "slim_over_checkpoint_size": slim.stat().st_size / ckpt.stat().st_size,
            "checkpoint_load_s": unpickle, "first_load_s": first, "slim_load_s": later,
            "slim_over_checkpoint_load_time": later / unpickle, "slim_over_first_load_time": later / first}


def _time_load(ckpt):
    from mdetr_agf import hub

    start = time.perf_counter()
    state, _ = hub.load_weights(ckpt)
    sum(float(v.float().sum()) for v in state.values() if v.numel())  # read every byte of the map
    return time.perf_counter() - start


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="512 px instead of 800, fewer repeats")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1, help="torch threads in every figure's process (default 1)")
    p.add_argument("--ckpt", help="a Zenodo-format file for the cold-load figures ('make' writes one)")
    p.add_argument("--size", type=int, help="MDETR input height in px (default 800, --quick 512)")
    p.add_argument("--scaling", type=int, nargs="*",
                   help="heights of the R101 scaling row (default 320 512 800; --quick 320 512)")
    p.add_argument("--batched-size", type=int, default=512, help="height for the 8-target comparison")
    p.add_argument("--figure", help=argparse.SUPPRESS)  # family:figure:size:repeats, run in a child process
    args = p.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if args.figure:
        family, figure, size, repeats = args.figure.split(":")
        print(json.dumps(measure(family, figure, int(size), int(repeats), device)))
        return
    size = args.size or (512 if args.quick else 800)
    repeats = 2 if args.quick else 3
    if args.scaling is None:
        args.scaling = [320, 512] if args.quick else [320, 512, 800]
    results = {"machine": {"platform": platform.platform(), "processor": _cpu_name(), "cpu_count": os.cpu_count(),
                           "torch": torch.__version__, "threads": args.threads,
                           "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"},
               "quick": args.quick}
    results.update(bench_models(args, size, repeats))
    if args.ckpt:
        if args.ckpt == "make":  # 3.7 GB with its slim copy: removed afterwards
            with tempfile.TemporaryDirectory() as folder:
                results.update(bench_cold_load(zenodo_file(Path(folder) / "pretrained_resnet101_checkpoint.pth")))
        else:
            results.update(bench_cold_load(args.ckpt))
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
