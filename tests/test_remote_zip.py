"""Fetching only the weights of a Zenodo-format checkpoint with HTTP Range, and checking whole
downloads member by member.

The file is written with torch.save exactly as MDETR's training writes it (model, model_ema,
an AdamW state per parameter, epoch, args as a Namespace) around the bundled toy model, so
the weights are a quarter of the bytes; it is served by the real HTTP server of test_hub,
which counts the body bytes it sends.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import multiprocessing
import re
import struct
import time
import zipfile
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file

from mdetr_agf import hub, load_model
from mdetr_agf.cli import main as cli_main
from mdetr_agf.errors import CheckpointError, DownloadError
from mdetr_agf.hub.remote_zip import fetch_weights
from mdetr_agf.hub.torch_zip import Archive, Storage, Unsupported
from test_hub import _RunsCode, gets, server  # noqa: F401  (server is a fixture)

NAME, FILE = "toy_remote", "toy_remote_checkpoint.pth"
ARGS = argparse.Namespace(backbone="small_cnn_s16", lr=1e-4, ema=True, combine_datasets=["shapes"],
                          frozen_weights=None, text_encoder_type="toy", seed=42)


def toy_state():
    return OrderedDict(load_file(str(hub.catalog.PACKAGE_DIR / "assets/toy/model.safetensors")))


def zenodo_bytes(tmp_path, *, torch1_layout=False, ema=True, extra=None) -> bytes:
    """A checkpoint as MDETR's main.py saves it; `torch1_layout` reorders the members as
    torch < 2.1 wrote them (storages sorted by key as strings), as in the published files."""
    model = toy_state()
    g = torch.Generator().manual_seed(0)
    state = {i: {"step": torch.tensor(1000.0), "exp_avg": torch.randn(t.shape, generator=g),
                 "exp_avg_sq": torch.rand(t.shape, generator=g)} for i, t in enumerate(model.values())}
    ckpt = {"model": model, "model_ema": OrderedDict((k, v + 1) for k, v in model.items()),
            "optimizer": {"state": state, "param_groups": [
                {"lr": 1e-4, "weight_decay": 1e-4, "params": list(range(len(model)))}]},
            "epoch": 39, "args": ARGS, **(extra or {})}
    if not ema:
        del ckpt["model_ema"]
    path = tmp_path / "written.pth"
    torch.save(ckpt, path)
    data = path.read_bytes()
    return _torch1_layout(data) if torch1_layout else data


def _torch1_layout(data: bytes, zip64=False) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(data))
    names = src.namelist()
    storage = sorted((n for n in names if "/data/" in n), key=lambda n: n.rsplit("/", 1)[1])
    order = [n for n in names if "/data/" not in n and not n.endswith("/version")] + storage + \
        [n for n in names if n.endswith("/version")]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for name in order:
            start = out.tell() + 30 + len(name.encode()) + 4
            pad = -start % 64  # torch aligns every record to 64 bytes with an extra field
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.extra = struct.pack("<HH", 0x4246, pad) + b"\0" * pad
            with dst.open(info, "w", force_zip64=zip64) as f:  # zip64: as files over 4 GB have
                f.write(src.read(name))
    return out.getvalue()


def data_offset(data: bytes, member_suffix: str) -> tuple[str, int]:
    """(member name, offset of its first data byte) in a zip held in memory."""
    zf = zipfile.ZipFile(io.BytesIO(data))
    info = next(i for i in zf.infolist() if i.filename.endswith(member_suffix))
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    return info.filename, info.header_offset + 30 + name_len + extra_len


@pytest.fixture
def remote(server, cache, monkeypatch, tmp_path):  # noqa: F811
    """The toy entry published at the test server, and the reference weights of the file."""
    entry = dataclasses.replace(hub.catalog.registry()["toy"], name=NAME, file=FILE, sha256=None,
                                url=f"https://zenodo.org/record/4721981/files/{FILE}")
    real = hub.catalog.registry
    monkeypatch.setattr(hub.catalog, "registry", lambda: {**real(), NAME: entry})
    monkeypatch.setattr(hub, "registry", hub.catalog.registry)

    def publish(mode="ok", **kw):
        data = zenodo_bytes(tmp_path, **kw)
        server.files[FILE] = data
        monkeypatch.setenv(hub.MIRROR_ENV, f"{server.url}/{mode}/")
        return data

    server.publish = publish
    return server


def reference(tmp_path, data, use_ema=False):
    """The weights as the whole file gives them (torch's loader, no slim copy involved)."""
    path = tmp_path / "whole" / FILE
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return hub.read_checkpoint(path)["model_ema" if use_ema else "model"]


def assert_identical(model_or_state, expected):
    got = model_or_state if isinstance(model_or_state, dict) else model_or_state.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def range_gets(srv):
    return [r for _, r in srv.log if r]


@pytest.mark.parametrize("torch1_layout", [False, True], ids=["torch2_layout", "torch1_layout"])
def test_load_model_fetches_only_the_weights(remote, cache, tmp_path, torch1_layout):
    data = remote.publish(torch1_layout=torch1_layout)
    model = load_model(NAME, progress=False)
    assert_identical(model, reference(tmp_path, data))
    assert remote.sent <= 0.3 * len(data), (remote.sent, len(data))
    # tail + central directory, data.pkl, the weights: few requests, each a Range. torch 1
    # wrote the storages of all entries interleaved: far fewer requests than tensors still.
    requests_made = len(range_gets(remote))
    assert requests_made == len(remote.log)
    assert requests_made <= (len(model.state_dict()) // 2 if torch1_layout else 4), remote.log
    assert not (cache / FILE).exists() and (cache / f"{FILE}.slim.safetensors").is_file()
    assert not list(cache.glob("*.part")) and not list(cache.glob("*.tmp"))
    sent = remote.sent
    assert_identical(load_model(NAME, progress=False), reference(tmp_path, data))
    assert remote.sent == sent  # the slim copy answers


def test_use_ema_fetches_the_averaged_weights(remote, cache, tmp_path):
    data = remote.publish(torch1_layout=True)
    state, args = hub.load_weights(hub.resolve(NAME, progress=False, use_ema=True), use_ema=True)
    assert_identical(state, reference(tmp_path, data, use_ema=True))
    assert args == vars(ARGS)
    assert remote.sent <= 0.3 * len(data)
    assert (cache / f"{FILE}.slim.ema.safetensors").is_file() and not (cache / FILE).exists()


def test_the_weights_match_a_full_load_of_the_same_file(remote, cache, tmp_path):
    data = remote.publish()
    fetched = hub.load_weights(hub.resolve(NAME, progress=False))
    whole = tmp_path / "whole.pth"
    whole.write_bytes(data)
    full = hub.load_weights(whole)  # torch's weights-only loader, then its slim copy
    assert list(fetched[0]) == list(full[0]) and fetched[1] == full[1]
    assert_identical(fetched[0], full[0])


def test_redirects_are_followed(remote, cache, tmp_path):
    data = remote.publish("redirect")
    assert_identical(load_model(NAME, progress=False), reference(tmp_path, data))
    paths = gets(remote)
    assert paths[0] == f"/redirect/{FILE}" and f"/ok/{FILE}" in paths
    assert remote.sent <= 0.3 * len(data)


def test_a_server_without_suffix_ranges_still_serves_only_the_weights(remote, cache, tmp_path):
    data = remote.publish("nosuffix")
    assert_identical(load_model(NAME, progress=False), reference(tmp_path, data))
    assert range_gets(remote)[:2] == ["bytes=-65664", "bytes=0-65535"]
    asked = [tuple(map(int, r[6:].split("-"))) for r in range_gets(remote)[1:]]
    assert sum(b - a + 1 for a, b in asked) <= 0.3 * len(data), asked  # besides the refused try
    assert not (cache / FILE).exists()


def test_a_server_without_range_gives_the_same_weights_by_the_full_path(remote, cache, tmp_path):
    data = remote.publish("norange")
    assert_identical(load_model(NAME, progress=False), reference(tmp_path, data))
    assert (cache / FILE).read_bytes() == data  # the whole file, checked and kept
    # two Range tries (from the end, from the start: both answered 200), then the download
    assert gets(remote) == [f"/norange/{FILE}"] * 3


def test_full_download_keeps_the_whole_file(remote, cache, tmp_path):
    data = remote.publish()
    assert_identical(load_model(NAME, progress=False, full_download=True), reference(tmp_path, data))
    assert (cache / FILE).read_bytes() == data
    assert range_gets(remote) == []


def test_cli_download_full_keeps_the_whole_file(remote, cache, capsys):
    data = remote.publish()
    assert cli_main(["download", NAME]) == 0
    assert capsys.readouterr().out.strip() == str(cache / f"{FILE}.slim.safetensors")
    assert remote.sent <= 0.3 * len(data)
    assert cli_main(["download", NAME, "--full"]) == 0
    assert capsys.readouterr().out.strip() == str(cache / FILE)
    assert (cache / FILE).read_bytes() == data


def test_a_cut_connection_resumes_where_it_stopped(remote, cache, tmp_path):
    data = remote.publish("cutbig")
    assert_identical(load_model(NAME, progress=False), reference(tmp_path, data))
    ranges = range_gets(remote)
    big = [r for r in ranges if not r.startswith("bytes=-")]
    # the weights' range, cut halfway, then its second half only
    first, again = (tuple(map(int, r[6:].split("-"))) for r in big[-2:])
    assert first[1] == again[1] and again[0] == first[0] + (first[1] - first[0] + 1) // 2
    assert remote.sent <= 0.3 * len(data)


def test_a_fetch_stopped_for_good_is_resumed_by_the_next_call(remote, cache, tmp_path, monkeypatch):
    data = remote.publish("dropbig")  # every try of the weights' range breaks halfway
    with pytest.raises(DownloadError) as err:
        load_model(NAME, progress=False)
    part = cache / f"{FILE}.slim.safetensors.part"
    assert str(part) in str(err.value) and "resumes" in str(err.value)
    kept = part.stat().st_size
    assert kept > 0
    monkeypatch.setenv(hub.MIRROR_ENV, f"{remote.url}/ok/")
    before = remote.sent
    assert_identical(load_model(NAME, progress=False), reference(tmp_path, data))
    resumed = [r for p, r in remote.log if p.startswith("/ok/") and r and not r.startswith("bytes=-")]
    weights_range = resumed[-1]
    assert int(weights_range[6:].split("-")[0]) > 0
    assert remote.sent - before < 0.3 * len(data) - kept + 2 * (1 << 16)  # kept bytes not fetched again
    assert not part.exists()


def test_a_corrupted_byte_in_a_fetched_member_is_named(remote, cache, tmp_path):
    data = remote.publish(torch1_layout=True)
    member, offset = data_offset(data, "/data/3")  # a storage of the "model" entry
    remote.flip = offset + 5
    with pytest.raises(DownloadError) as err:
        load_model(NAME, progress=False)
    assert member in str(err.value) and "CRC" in str(err.value)
    assert not list(cache.glob(f"{FILE}*.safetensors*"))  # nothing corrupt kept
    remote.flip = None
    assert_identical(load_model(NAME, progress=False), reference(tmp_path, data))


def test_a_truncated_full_download_is_detected_deleted_and_fetched_again(remote, cache, tmp_path):
    data = remote.publish("norange")
    remote.files[FILE] = data[: len(data) * 2 // 3]  # what a broken transfer leaves
    with pytest.raises(DownloadError) as err:
        load_model(NAME, progress=False)
    msg = str(err.value)
    assert FILE in msg and "central directory" in msg and "deleted" in msg
    assert not (cache / FILE).exists() and not (cache / f"{FILE}.part").exists()
    remote.files[FILE] = data
    assert_identical(load_model(NAME, progress=False), reference(tmp_path, data))
    assert (cache / FILE).read_bytes() == data


def test_a_corrupted_byte_in_a_full_download_is_named(remote, cache, tmp_path):
    data = remote.publish("norange")
    member, offset = data_offset(data, "/data/0")
    remote.flip = offset
    with pytest.raises(DownloadError) as err:
        load_model(NAME, progress=False)
    assert member in str(err.value) and FILE in str(err.value) and "deleted" in str(err.value)
    assert not (cache / FILE).exists()


def test_a_local_file_with_a_corrupted_weight_is_refused(tmp_path):
    data = bytearray(zenodo_bytes(tmp_path))
    member, offset = data_offset(bytes(data), "/data/7")
    data[offset] ^= 1
    path = tmp_path / "mine.pth"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        hub.load_weights(path)
    assert member in str(err.value) and str(path) in str(err.value) and "delete it" in str(err.value)
    assert not (tmp_path / "mine.pth.slim.safetensors").exists()


def test_use_ema_without_ema_weights_lists_the_entries(remote, cache):
    remote.publish(ema=False)
    with pytest.raises(CheckpointError) as err:
        hub.resolve(NAME, progress=False, use_ema=True)
    assert "'model_ema'" in str(err.value)
    for key in ("args", "epoch", "model", "optimizer"):
        assert key in str(err.value)
    assert remote.sent < 0.05 * len(remote.files[FILE])  # found out from the metadata alone


def test_code_in_data_pkl_never_runs_on_the_range_path(remote, cache, tmp_path):
    sentinel = tmp_path / "pwned"
    remote.publish("ok", extra={"payload": _RunsCode(sentinel)})
    with pytest.raises(CheckpointError, match="refused"):
        load_model(NAME, progress=False)
    assert not sentinel.exists()


def test_the_progress_bar_counts_the_bytes_fetched(remote, cache, capsys):
    data = remote.publish()
    hub.resolve(NAME)
    err = capsys.readouterr().err
    assert FILE in err and "100%" in err
    totals = [float(m) for m in re.findall(r"/([\d.]+)M", err)]  # tqdm: "3.47M/3.47M"
    assert totals and max(totals) * (1 << 20) < 0.3 * len(data)


def test_models_lists_fetched_weights_as_cached(remote, cache, capsys):
    remote.publish()
    hub.resolve(NAME, progress=False)
    assert cli_main(["models"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(NAME))
    assert row.split()[-1] == "weights"


def test_a_file_that_is_not_a_zip_falls_back_to_the_full_download(remote, cache):
    remote.publish()
    remote.files[FILE] = b"not a zip archive " * 5000
    assert hub.resolve(NAME, progress=False) == cache / FILE
    assert [r is not None and r.startswith("bytes=-") for _, r in remote.log] == [True, False]


def test_zip64_records_are_read(remote, cache, tmp_path):
    data = remote.publish(torch1_layout=True)
    remote.files[FILE] = data = _torch1_layout(data, zip64=True)
    assert b"\x01\x00\x10\x00" in data  # zip64 extra fields in the headers
    assert_identical(load_model(NAME, progress=False), reference(tmp_path, data))
    assert remote.sent <= 0.3 * len(data)


def test_a_stalled_server_times_out_in_bounded_time(remote, cache):
    remote.publish("stall")
    dest = hub.cache_dir() / FILE
    t0 = time.monotonic()
    with pytest.raises(DownloadError) as err:
        fetch_weights(f"{remote.url}/stall/{FILE}", dest, hub.checkpoint.slim_path(dest),
                      progress=False, timeout=0.4)
    assert time.monotonic() - t0 < 8
    assert "timed out" in str(err.value) and FILE in str(err.value)


def test_two_processes_fetch_the_weights_once(remote, cache):
    remote.publish("gate")  # the first reply stops halfway until the test opens the gate
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=hub.resolve, args=(NAME,), kwargs={"progress": False}) for _ in range(2)]
    procs[0].start()
    deadline = time.monotonic() + 30
    while not remote.log and time.monotonic() < deadline:
        time.sleep(0.02)
    procs[1].start()
    time.sleep(1.0)  # the second one reaches the lock and waits
    remote.gate.set()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sum(1 for _, r in remote.log if r.startswith("bytes=-")) == 1  # one fetch
    assert (cache / f"{FILE}.slim.safetensors").is_file()


def test_a_truncated_file_in_the_cache_is_deleted_and_fetched_again(remote, cache, tmp_path):
    data = remote.publish()
    hub.cache_dir()
    (cache / FILE).write_bytes(data[: len(data) // 2])  # e.g. a broken copy made by hand
    with pytest.raises(DownloadError) as err:
        load_model(NAME, progress=False)
    assert str(cache / FILE) in str(err.value) and "deleted" in str(err.value)
    assert not (cache / FILE).exists() and remote.log == []
    assert_identical(load_model(NAME, progress=False), reference(tmp_path, data))


def test_the_restricted_reader_records_tensors_and_runs_nothing(tmp_path):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "h.pth"
    w = torch.arange(6.0).reshape(2, 3)
    torch.save({"model": OrderedDict(w=w, wt=w.t()), "args": ARGS}, path)
    with open(path, "rb") as f:
        entries = Archive(f, str(path)).entries()
    w_rec, wt_rec = entries["model"].values()
    assert w_rec.storage == wt_rec.storage == Storage("0", "float32", 6)
    assert (w_rec.size, w_rec.stride, wt_rec.size, wt_rec.stride) == ((2, 3), (3, 1), (3, 2), (1, 3))
    assert entries["args"] == ARGS
    torch.save({"model": {"w": w}, "payload": _RunsCode(sentinel)}, path)
    with open(path, "rb") as f, pytest.raises(Unsupported, match="open"):
        Archive(f, str(path)).entries()
    assert not sentinel.exists()


def test_the_download_deadline_bounds_the_fetch(remote, cache, monkeypatch):
    remote.publish("trickle")  # one byte every 0.5 s
    monkeypatch.setenv("MDETR_AGF_DOWNLOAD_DEADLINE", "1.5")
    t0 = time.monotonic()
    with pytest.raises(DownloadError) as err:
        hub.resolve(NAME, progress=False)
    assert time.monotonic() - t0 < 8
    assert "1.5 s" in str(err.value) and "MDETR_AGF_DOWNLOAD_DEADLINE" in str(err.value)
