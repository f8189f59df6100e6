"""AGF's cost against a plain forward+backward, batched targets, and cold checkpoint loads.

    python benchmarks/bench_agf.py --quick --json bench.json [--device cpu|cuda] [--ckpt PATH]

Side by side in one process (warm-up, then the median of repeats): torchvision ResNet-50 at
224 px; MDETR-R101 (random weights: timing does not depend on their values) at 512 px (320 px
under --quick); AGF for 8 targets of one image in one call against 8 calls; GAE; peak memory.
Cold loads: a Zenodo-format file (model, model_ema, an Adam state per parameter, epoch, args —
about four times the weights) read the first time (which writes the slim safetensors copy)
against later loads of the slim copy.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdetr_agf.explain import explain, explain_classifier  # noqa: E402
from mdetr_agf.explain.targets import QueryTokenTarget  # noqa: E402
from mdetr_agf.models.build import FAMILIES, build_model  # noqa: E402


def timed(fn, repeats, device):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory(fn, device):
    """MiB the call needs above what was in use before it: CUDA's allocator peak, or on the CPU
    the process's resident set sampled every 2 ms (freed heap is handed back first with
    malloc_trim, so memory earlier calls left to the allocator does not hide this call's)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    import ctypes
    import gc
    import threading

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the figure may be an underestimate
        pass
    page = os.sysconf("SC_PAGE_SIZE")

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    base, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            done.wait(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], rss()) - base >> 20


def bench_resnet50(device, repeats):
    model = torchvision.models.resnet50(weights=None).eval().to(device)
    x = torch.randn(1, 3, 224, 224, device=device)

    def plain():
        xi = x.detach().requires_grad_(True)
        logits = model(xi)
        logits[0, logits[0].argmax()].backward()

    def agf():
        explain_classifier(model, x)

    t_plain, t_agf = timed(plain, repeats, device), timed(agf, repeats, device)
    return {"resnet50_fwd_bwd_s": t_plain, "resnet50_agf_s": t_agf, "resnet50_agf_over_fwd_bwd": t_agf / t_plain}


def bench_mdetr(device, repeats, size):
    torch.manual_seed(0)
    model = build_model(FAMILIES["mdetr_resnet101"]).to(device)
    image = torch.randn(3, size, size * 4 // 3, device=device)
    ids = torch.tensor([[0, 102, 4758, 8, 10, 2335, 15, 10, 34141, 2]], device=device)
    text = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    target = QueryTokenTarget(0, (1, 2))

    def plain():
        out = model(images=image[None].requires_grad_(True), text=text)
        target(out).backward()

    def agf_one():
        explain(model, image, text, target=target)

    targets = [QueryTokenTarget(q, (1 + q % 8,)) for q in range(8)]

    def agf_batched():
        explain(model, image, text, target=targets)

    def agf_singles():
        for t in targets:
            explain(model, image, text, target=t)

    def gae():
        explain(model, image, text, target=target, method="gae")

    res = {"mdetr_r101_input": [size, size * 4 // 3]}
    res["mdetr_r101_fwd_bwd_s"] = timed(plain, repeats, device)
    res["mdetr_r101_agf_s"] = timed(agf_one, repeats, device)
    res["mdetr_r101_agf_over_fwd_bwd"] = res["mdetr_r101_agf_s"] / res["mdetr_r101_fwd_bwd_s"]
    res["mdetr_r101_gae_s"] = timed(gae, repeats, device)
    res["agf_8_targets_one_call_s"] = timed(agf_batched, max(1, repeats // 2), device)
    res["agf_8_single_calls_s"] = timed(agf_singles, max(1, repeats // 2), device)
    res["batched8_over_8_singles"] = res["agf_8_targets_one_call_s"] / res["agf_8_single_calls_s"]
    res["peak_memory_mib"] = {"fwd_bwd": peak_memory(plain, device), "agf": peak_memory(agf_one, device),
                              "gae": peak_memory(gae, device)}
    return res


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
    p.add_argument("--quick", action="store_true", help="smaller MDETR input, fewer repeats")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--ckpt", help="a Zenodo-format file for the cold-load figures ('make' writes one)")
    p.add_argument("--size", type=int, help="MDETR input height in px (default 512, --quick 320, cuda 800)")
    args = p.parse_args()
    device = torch.device(args.device)
    repeats = 3 if args.quick else 5
    size = args.size or (800 if device.type == "cuda" else 320 if args.quick else 512)
    results = {"machine": {"platform": platform.platform(), "processor": _cpu_name(),
                           "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                           "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"},
               "quick": args.quick}
    results.update(bench_resnet50(device, repeats))
    print(json.dumps(results, indent=1), flush=True)
    results.update(bench_mdetr(device, repeats, size))
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
