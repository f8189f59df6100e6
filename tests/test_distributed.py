"""Jobs shared between processes by the real torchrun (gloo on the CPU): sharded evaluation gives
the single process's JSON, a killed rank ends the job, a rerun resumes from the journal, and
the toy trains data-parallel to the weights one process gives over the same batches."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
SCENES = ["--scenes", "8", "--seed", "2000000"]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(command, timeout=600, environ=None):
    done = subprocess.run(command, cwd=REPO, env=environ or env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def without_world_size(path):
    result = json.loads(Path(path).read_text())
    return result.pop("world_size"), result


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The six methods on 8 toy scenes in one process (one thread)."""
    out = tmp_path_factory.mktemp("single") / "single.json"
    run([sys.executable, "-m", "mdetr_agf", "evaluate", *SCENES, "--json", str(out), "--no-progress"])
    return without_world_size(out)


def test_two_ranks_write_the_single_process_json(single, tmp_path):
    out, journal = tmp_path / "sharded.json", tmp_path / "sharded.jsonl"
    done = run(TORCHRUN + ["-m", "mdetr_agf", "evaluate", *SCENES, "--json", str(out), "--journal", str(journal)])
    world, result = without_world_size(out)
    assert single[0] == 1 and world == 2
    assert result == single[1]
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    assert "journal" in lines[0] and sorted(r["index"] for r in lines[1:]) == list(range(8))
    assert done.stderr.count("evaluating") >= 1 and "8/8" in done.stderr  # one bar, rank 0's, over all 8


def test_a_killed_rank_ends_the_job_and_a_rerun_resumes(single, tmp_path):
    out, journal = tmp_path / "out.json", tmp_path / "job.jsonl"
    command = TORCHRUN + ["-m", "mdetr_agf", "evaluate", *SCENES, "--json", str(out), "--journal", str(journal),
                          "--no-progress"]
    job = subprocess.Popen(command, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (journal.exists() and len(journal.read_text().splitlines()) >= 2):  # the header and a scene
            assert job.poll() is None and time.monotonic() < deadline, job.stdout.read()
            time.sleep(0.1)
        rank1 = [p for p in psutil.Process(job.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
        assert len(rank1) == 1
        rank1[0].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        output, _ = job.communicate(timeout=60)  # bounded: torchrun ends the other rank, no hang
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0 and time.monotonic() - killed < 60
    assert "Signal 9" in output or "SIGKILL" in output, output[-3000:]
    assert not out.exists()
    finished = {json.loads(line)["index"] for line in journal.read_text().splitlines()[1:]}
    assert 1 <= len(finished) < 8

    run([sys.executable, "-m", "mdetr_agf", "evaluate", *SCENES, "--json", str(out), "--journal", str(journal),
         "--no-progress"])
    indices = [json.loads(line)["index"] for line in journal.read_text().splitlines()[1:]]
    assert sorted(indices) == list(range(8))  # the finished scenes were not scored again
    assert without_world_size(out) == single


def test_evaluation_options_are_no_prefix_of_torchrun_options():
    """torchrun parses the whole command line: an option of ours that abbreviates one of its own
    (``--n``: ``--nnodes``, ``--nproc-per-node``) makes it exit before the job starts."""
    import importlib.util

    from torch.distributed.run import get_args_parser

    from mdetr_agf.cli import parser

    theirs = [o for a in get_args_parser()._actions for o in a.option_strings]
    spec = importlib.util.spec_from_file_location("eval_refcoco", REPO / "scripts" / "eval_refcoco.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    evaluate = parser()._subparsers._group_actions[0].choices["evaluate"]
    for ours in (evaluate, script.arg_parser()):
        options = [o for a in ours._actions for o in a.option_strings if o.startswith("--") and o not in ("--n", "--help")]
        assert options and not [o for o in options if any(t.startswith(o) for t in theirs)]
    assert any(t.startswith("--n") for t in theirs)  # the old name stays for runs without torchrun


def test_toy_trains_with_ddp_to_the_single_process_weights(tmp_path):
    """Three steps of toy training in two torchrun processes (DistributedDataParallel, two images
    of each four-image batch per process) end with the weights of one process training on the
    whole batches: the losses are divided by the whole batch's box count, so the averaged
    gradient is the single process's. Both runs happen here, on this CPU; every rank ends with
    exactly the same weights."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir(), ddp.mkdir()
    run([sys.executable, "tests/ddp_toy_training.py", str(single)])
    run(TORCHRUN + ["tests/ddp_toy_training.py", str(ddp)])
    one, rank0, rank1 = (load_file(p) for p in (single / "rank0.safetensors", ddp / "rank0.safetensors",
                                                  ddp / "rank1.safetensors"))
    assert set(one) == set(rank0) == set(rank1)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    # Measured: at most 5.0e-6 apart (float rounding: the processes' matrices are half as tall and
    # their captions padded to their own longest); dividing by each process's own box count
    # instead puts them 4.5e-3 apart.
    worst = max(float((rank0[k] - one[k]).abs().max()) for k in one)
    assert worst <= 2e-5, worst
    meta = {}
    for name, path in (("single", single), ("ddp", ddp)):
        with safe_open(str(path / "rank0.safetensors"), "pt") as f:
            meta[name] = {k: json.loads(v) for k, v in f.metadata().items()}
    assert meta["single"]["options"]["processes"] == 1 and meta["ddp"]["options"]["processes"] == 2
    assert {**meta["ddp"]["options"], "processes": 1} == meta["single"]["options"]
    assert meta["ddp"]["losses"] == pytest.approx(meta["single"]["losses"], rel=1e-6)  # the whole batch's loss
