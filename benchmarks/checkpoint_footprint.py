"""Disk and RAM each checkpoint layout needs: the README's "what it costs" table comes from here.

    MDETR_AGF_CONFORMANCE=../shared/conformance python benchmarks/checkpoint_footprint.py [--size 800] [--json out.json]

For each of the eight state-dict layouts, the conformance folder's stand-in weights (same keys,
shapes and dtypes as the published files' "model" entry) are written as the slim safetensors copy
`load_model` keeps, and its size is what a checkpoint costs on disk once loaded. Then, in a fresh
process each, `load_model(name, checkpoint=<that copy>)` and one forward at `--size` px (shorter
side, 4:3, as MDETR resizes a photo) record the peak resident memory. Values of the weights do not
change sizes or memory, so stand-ins measure what the real files need.
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFORMANCE = Path(os.environ.get("MDETR_AGF_CONFORMANCE", REPO.parent / "shared" / "conformance"))
FAMILIES = ["mdetr_resnet101", "mdetr_efficientnetB3", "mdetr_efficientnetB5", "mdetr_clevr", "mdetr_resnet101_gqa",
            "mdetr_efficientnetB5_gqa", "mdetr_resnet101_phrasecut", "mdetr_efficientnetB3_phrasecut"]

CHILD = r"""
import sys, torch
sys.path.insert(0, sys.argv[4])
from mdetr_agf import load_model
def peak_mb():  # VmHWM starts afresh at exec (ru_maxrss would carry the parent's peak over)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024
torch.set_grad_enabled(False)
before = peak_mb()
model = load_model(sys.argv[1], checkpoint=sys.argv[2])
loaded = peak_mb()
size = int(sys.argv[3])
image = torch.randn(3, size, size * 4 // 3)
text = {"input_ids": torch.tensor([[0, 627, 1275, 11758, 2]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
model(images=[image], text=text)
print(before, loaded, peak_mb())
"""


def stand_in_weights():
    spec = importlib.util.spec_from_file_location("conformance_weights", CONFORMANCE / "weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(family, size, folder, threads):
    from safetensors.torch import save_file

    manifest = json.loads((CONFORMANCE / "mdetr" / f"{family}.manifest.json").read_text())
    state = stand_in_weights().make_state_dict([(k, s) for k, s, _ in manifest])
    slim = folder / f"{family}.slim.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(slim), metadata={"order": json.dumps(list(state))})
    tensor_bytes = sum(v.numel() * v.element_size() for v in state.values())
    del state
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", CHILD, family, str(slim), str(size), str(REPO)],
                         capture_output=True, text=True, check=True, env=env)
    start, loaded, forward = map(float, out.stdout.split())
    row = {"family": family, "slim_bytes": slim.stat().st_size, "tensor_bytes": tensor_bytes,
           "interpreter_mb": start, "peak_after_load_mb": loaded, "peak_after_forward_mb": forward, "size": size}
    slim.unlink()
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=800, help="shorter image side for the forward (default: 800)")
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated layouts (default: all eight)")
    p.add_argument("--json", help="write the rows here (default: not written)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in each measuring process (default: 2)")
    args = p.parse_args()
    if not (CONFORMANCE / "weights.py").is_file():
        sys.exit(f"the conformance folder is needed for the stand-in layouts: not found at {CONFORMANCE}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        print("| layout | slim copy | peak RAM: load | peak RAM: load + one forward at "
              f"{args.size} px |\n| --- | --- | --- | --- |")
        for family in args.families.split(","):
            row = measure(family, args.size, Path(tmp), args.threads)
            rows.append(row)
            print(f"| {family} | {row['slim_bytes'] / 1e9:.2f} GB | {row['peak_after_load_mb'] / 1024:.1f} GiB | "
                  f"{row['peak_after_forward_mb'] / 1024:.1f} GiB |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
