"""Wall time of `mdetr-agf --help` and `mdetr-agf models` in fresh processes (target: <= 0.5 s).

    python benchmarks/bench_cli.py [--repeat 5]

Each command runs as `python -m mdetr_agf ...` in a new interpreter, so the figure includes
Python's own start-up and every import the command pays for; the median of the repeats is
reported, with the interpreter's bare start-up (`python -c pass`) for reference.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

COMMANDS = {"python -c pass": ["-c", "pass"], "mdetr-agf --help": ["-m", "mdetr_agf", "--help"],
            "mdetr-agf models": ["-m", "mdetr_agf", "models"]}


def median_seconds(args, repeat, env):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, *args], check=True, stdout=subprocess.DEVNULL, env=env)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "MDETR_AGF_CACHE": cache}
        for name, command in COMMANDS.items():
            print(f"{name:18s} {median_seconds(command, args.repeat, env):.3f} s (median of {args.repeat})")


if __name__ == "__main__":
    main()
