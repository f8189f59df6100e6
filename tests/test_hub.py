"""The checkpoint registry, the downloader and safe checkpoint loading.

Zenodo is never contacted: every download goes to a small HTTP server on 127.0.0.1 that the
tests start and that misbehaves on purpose (drops connections, ignores Range, stalls, fails).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import random
import re
import shutil
import struct
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote

import pytest
import torch

from conftest import conformance_path
from mdetr_agf import hub
from mdetr_agf.errors import CheckpointError, DownloadError, MdetrAgfError, UnknownNameError

ZENODO_NAMES = {
    "mdetr_resnet101", "mdetr_efficientnetB3", "mdetr_efficientnetB5",
    "mdetr_clevr", "mdetr_clevr_humans",
    "mdetr_resnet101_gqa", "mdetr_efficientnetB5_gqa",
    "mdetr_resnet101_phrasecut", "mdetr_efficientnetB3_phrasecut",
    "mdetr_resnet101_refcoco", "mdetr_efficientnetB3_refcoco",
    "mdetr_resnet101_refcocoplus", "mdetr_efficientnetB3_refcocoplus",
    "mdetr_resnet101_refcocog", "mdetr_efficientnetB3_refcocog",
    "mdetr_resnet101_flickr",
    "mdetr_resnet101_lvis1", "mdetr_resnet101_lvis10", "mdetr_resnet101_lvis100",
}
# family -> (task, backbone, text encoder, queries): what the architecture fixes.
FAMILIES = {
    "mdetr_resnet101": ("detection", "resnet101", "roberta-base", 100),
    "mdetr_efficientnetB3": ("detection", "timm_tf_efficientnet_b3_ns", "roberta-base", 100),
    "mdetr_efficientnetB5": ("detection", "timm_tf_efficientnet_b5_ns", "roberta-base", 100),
    "mdetr_clevr": ("qa", "resnet18", "distilroberta-base", 25),
    "mdetr_resnet101_gqa": ("qa", "resnet101", "roberta-base", 100),
    "mdetr_efficientnetB5_gqa": ("qa", "timm_tf_efficientnet_b5_ns", "roberta-base", 100),
    "mdetr_resnet101_phrasecut": ("segmentation", "resnet101", "roberta-base", 100),
    "mdetr_efficientnetB3_phrasecut": ("segmentation", "timm_tf_efficientnet_b3_ns", "roberta-base", 100),
}
PAYLOAD = random.Random(0).randbytes(2 * (1 << 20) + 12345)  # > 2 chunks of 1 MiB
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


def zenodo_entries():
    return {n: e for n, e in hub.registry().items() if e.url}


# ================================================================ registry


def test_registry_has_the_19_zenodo_checkpoints():
    assert set(zenodo_entries()) == ZENODO_NAMES


@pytest.mark.parametrize("name", sorted(ZENODO_NAMES))
def test_entry_fields_are_complete_and_match_the_architecture(name):
    e = hub.get_entry(name)
    assert e.name == name
    assert re.fullmatch(r"https://zenodo\.org/record/4721981/files/[A-Za-z0-9_%.]+\.pth", e.url)
    assert unquote(e.url.rsplit("/", 1)[1]) == e.file == Path(e.file).name
    task, backbone, text_encoder, queries = FAMILIES[e.architecture]
    assert (e.task, e.backbone, e.text_encoder, e.num_queries) == (
        task, backbone, text_encoder, queries)
    assert isinstance(e.metric["name"], str) and e.metric["name"]
    assert 0 < e.metric["value"] <= 100
    assert re.fullmatch(r"\d+(\.\d+)?(MB|GB)", e.size)
    assert e.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", e.sha256)
    assert len(e.description) > 20


def test_refcoco_plus_urls_escape_the_plus_and_files_keep_it():
    for name in ("mdetr_resnet101_refcocoplus", "mdetr_efficientnetB3_refcocoplus"):
        e = hub.get_entry(name)
        assert "/refcoco%2B_" in e.url and "+" not in e.url and "?" not in e.url
        assert e.file.startswith("refcoco+_")


def test_headline_numbers_are_the_published_ones():
    value = {n: e.metric["value"] for n, e in zenodo_entries().items()}
    assert value["mdetr_resnet101_refcoco"] == 86.75
    assert value["mdetr_efficientnetB3_refcocog"] == 83.35
    assert value["mdetr_resnet101_gqa"] == 61.99
    assert value["mdetr_resnet101_phrasecut"] == 53.1
    assert value["mdetr_clevr"] == 99.7
    assert value["mdetr_resnet101_lvis10"] == 24.2
    assert hub.get_entry("mdetr_resnet101_flickr").file == "flickr_merged_resnet101_checkpoint.pth"


def test_every_architecture_has_a_conformance_manifest():
    manifests = {p.name.split(".")[0] for p in conformance_path("mdetr").glob("*.manifest.json")}
    assert {e.architecture for e in zenodo_entries().values()} == manifests == set(FAMILIES)


def test_annotations_asset_serves_gqa_and_refcoco():
    a = hub.assets()["mdetr_annotations"]
    assert a["url"] == "https://zenodo.org/record/4729015/files/mdetr_annotations.tar.gz"
    assert {"gqa_answer2id.json", "gqa_answer2id_by_type.json"} <= set(a["members"])
    assert {f"final_{d}_val.json" for d in ("refcoco", "refcoco+", "refcocog")} <= set(a["members"])
    assert set(a["used_by"]) == {"mdetr_resnet101_gqa", "mdetr_efficientnetB5_gqa", "scripts/eval_refcoco.py"}
    root = Path(__file__).resolve().parents[1]
    assert all(u in hub.registry() or (root / u).is_file() for u in a["used_by"])


def test_unknown_name_is_a_lookup_error_listing_valid_names():
    with pytest.raises(UnknownNameError) as err:
        hub.get_entry("mdetr_resnet50")
    assert isinstance(err.value, LookupError) and isinstance(err.value, MdetrAgfError)
    assert "mdetr_resnet50" in str(err.value) and "mdetr_resnet101_refcoco" in str(err.value)


def test_registry_gives_copies():
    entry = hub.registry()["mdetr_clevr"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.url = "http://evil.example/x.pth"
    entry.metric["value"] = 0  # the one mutable field: a copy
    assert hub.get_entry("mdetr_clevr").metric["value"] == 99.7


def test_package_finds_the_registry_through_a_relative_symlink():
    link = Path(hub.__file__).parent.with_name("checkpoints.json")
    assert link.is_symlink() and os.readlink(link) == "../checkpoints.json"
    root = link.parent.parent / "checkpoints.json"
    assert json.loads(link.read_text()) == json.loads(root.read_text())
    assert json.loads(root.read_text())["schema"] == 1


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "c" / "d"))
    assert hub.cache_dir() == tmp_path / "c" / "d" and (tmp_path / "c" / "d").is_dir()


# ================================================================ a misbehaving server


class _Handler(BaseHTTPRequestHandler):
    """GET /<mode>/<file>, honouring Range (bytes=a-b, a-, -n) and counting the body bytes it
    sends. Modes: ok, cut (first reply dropped halfway), norange (ignores Range), stall
    (sends 1000 bytes, then nothing), gate (half, then waits for the test), trickle (one byte
    every 0.5 s; trickle-nolength without a length), slowheaders (headers at one byte every
    0.5 s), nolength (no Content-Length), redirect (302 to ok), nosuffix (ignores Range
    bytes=-n), cutbig (the first reply over 1 MiB dropped halfway), dropbig (every reply over
    256 KiB dropped halfway), status/<code>. `srv.flip` (file offset) serves that byte inverted."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        with srv.lock:
            earlier = sum(1 for p, _ in srv.log if p == self.path)
            srv.log.append((self.path, self.headers.get("Range")))
        mode, _, name = self.path.lstrip("/").partition("/")
        if mode == "status":
            self.send_error(int(name))
            return
        if mode == "redirect":
            self.send_response(302)
            self.send_header("Location", f"/ok/{name}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if mode == "slowheaders":
            self.wfile.write(b"HTTP/1.0 200 OK\r\nX-Slow: ")
            while not srv.release.wait(0.5):
                self.wfile.write(b"a")
                self.wfile.flush()
            return
        data = srv.files.get(unquote(name))
        if data is None:
            self.send_error(404)
            return
        if srv.flip is not None:
            data = bytearray(data)
            data[srv.flip] ^= 0xFF
            data = bytes(data)
        start, end = 0, len(data)
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range") or "")
        if m and mode != "norange" and (m.group(1) or m.group(2) and mode != "nosuffix"):
            if m.group(1):
                start = int(m.group(1))
                end = min(len(data), int(m.group(2)) + 1) if m.group(2) else len(data)
            else:
                start = max(0, len(data) - int(m.group(2)))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:end]
        if "nolength" not in mode:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with srv.lock:
            cut_now = (mode == "dropbig" and len(body) > (1 << 18)
                       or mode == "cutbig" and len(body) > (1 << 20) and not srv.cut_done)
            srv.cut_done |= cut_now
        if mode == "cut" and earlier == 0 or cut_now:
            body = body[: len(body) // 2]  # then HTTP/1.0 closes the connection
        elif mode == "stall":
            body = body[:1000]
        elif mode.startswith("trickle"):
            for i in range(len(body)):
                self._send(body[i:i + 1])
                if srv.release.wait(0.5):
                    break
            return
        elif mode == "gate":
            self._send(body[: len(body) // 2])
            srv.gate.wait(20)
            body = body[len(body) // 2:]
        self._send(body)
        if mode == "stall":
            srv.release.wait(10)

    def _send(self, body):
        try:
            self.wfile.write(body)
            self.wfile.flush()
        finally:
            with self.server.lock:
                self.server.sent += len(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request, client_address):
        pass  # clients that hang up on purpose are expected here


@pytest.fixture
def server():
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.files, srv.log, srv.lock = {}, [], threading.Lock()
    srv.sent, srv.flip, srv.cut_done = 0, None, False
    srv.release, srv.gate = threading.Event(), threading.Event()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.release.set()
    srv.gate.set()
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def gets(srv):
    return [p for p, _ in srv.log]


# ================================================================ downloader


def test_download_shows_a_byte_progress_bar_and_verifies(server, tmp_path, capsys):
    server.files["a.pth"] = PAYLOAD
    dest = hub.download(f"{server.url}/ok/a.pth", tmp_path / "a.pth", sha256=PAYLOAD_SHA)
    assert dest.read_bytes() == PAYLOAD
    err = capsys.readouterr().err
    assert "a.pth" in err and "100%" in err and "MB" in err
    assert not (tmp_path / "a.pth.part").exists()


def test_download_is_quiet_without_progress_and_skips_existing_files(server, tmp_path, capsys):
    server.files["a.pth"] = PAYLOAD
    for _ in range(2):
        hub.download(f"{server.url}/ok/a.pth", tmp_path / "a.pth", progress=False)
    assert capsys.readouterr().err == ""
    assert gets(server) == ["/ok/a.pth"]


def test_dropped_connection_is_resumed_with_a_range_request(server, tmp_path):
    server.files["a.pth"] = PAYLOAD
    dest = hub.download(f"{server.url}/cut/a.pth", tmp_path / "a.pth", progress=False)
    assert dest.read_bytes() == PAYLOAD
    (_, first), (_, second) = server.log
    assert first is None and second == f"bytes={len(PAYLOAD) // 2}-"  # no received byte lost


def test_a_part_file_left_by_an_earlier_run_is_resumed(server, tmp_path):
    server.files["a.pth"] = PAYLOAD
    (tmp_path / "a.pth.part").write_bytes(PAYLOAD[: 1 << 20])
    hub.download(f"{server.url}/ok/a.pth", tmp_path / "a.pth", sha256=PAYLOAD_SHA, progress=False)
    assert server.log == [("/ok/a.pth", f"bytes={1 << 20}-")]
    assert (tmp_path / "a.pth").read_bytes() == PAYLOAD


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.files["a.pth"] = PAYLOAD
    (tmp_path / "a.pth.part").write_bytes(b"stale bytes of another file" * 100)
    dest = hub.download(f"{server.url}/norange/a.pth", tmp_path / "a.pth", progress=False)
    assert server.log[0][1] is not None  # it asked to resume; the server answered 200
    assert dest.read_bytes() == PAYLOAD


@pytest.mark.parametrize("status", [404, 500])
def test_http_errors_name_the_url_and_status(server, tmp_path, status):
    url = f"{server.url}/status/{status}"
    with pytest.raises(DownloadError) as err:
        hub.download(url, tmp_path / "x.pth", progress=False)
    assert url in str(err.value) and str(status) in str(err.value)
    assert isinstance(err.value, OSError)
    assert not (tmp_path / "x.pth").exists()


def test_checksum_mismatch_deletes_the_file(server, tmp_path):
    corrupt = bytearray(PAYLOAD)
    corrupt[1000] ^= 0xFF
    server.files["a.pth"] = bytes(corrupt)
    url = f"{server.url}/ok/a.pth"
    with pytest.raises(DownloadError) as err:
        hub.download(url, tmp_path / "a.pth", sha256=PAYLOAD_SHA, progress=False)
    msg = str(err.value)
    assert url in msg and PAYLOAD_SHA in msg and hashlib.sha256(corrupt).hexdigest() in msg
    assert not (tmp_path / "a.pth").exists() and not (tmp_path / "a.pth.part").exists()


def test_stalled_server_times_out_in_bounded_time(server, tmp_path):
    server.files["a.pth"] = PAYLOAD
    url = f"{server.url}/stall/a.pth"
    t0 = time.monotonic()
    with pytest.raises(DownloadError) as err:
        hub.download(url, tmp_path / "a.pth", progress=False, timeout=0.4)
    assert time.monotonic() - t0 < 8
    assert "timed out" in str(err.value) and url in str(err.value)
    assert not (tmp_path / "a.pth").exists()
    assert (tmp_path / "a.pth.part").stat().st_size > 0  # kept for the next call


def test_too_little_free_space_fails_before_downloading(server, tmp_path, monkeypatch):
    server.files["a.pth"] = PAYLOAD
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(free=100))
    with pytest.raises(DownloadError, match="disk full"):
        hub.download(f"{server.url}/ok/a.pth", tmp_path / "a.pth", progress=False)
    assert not (tmp_path / "a.pth").exists() and not (tmp_path / "a.pth.part").exists()


def _waits_on_lock(pid: int, lock: Path) -> bool:
    """Whether process `pid` has the lock file open without holding the lock: it waits.

    Linux lists a process's open files in /proc/<pid>/fd and the locks held in /proc/locks.
    """
    try:
        opened = any(os.readlink(f) == str(lock) for f in Path(f"/proc/{pid}/fd").iterdir())
        with open("/proc/locks") as f:
            holds = any(str(pid) in line.split() for line in f)
    except OSError:  # the process just ended
        return False
    return opened and not holds


PROC_LOCKS = Path("/proc/locks").is_file()


def test_two_processes_fetching_one_file_download_once(server, tmp_path):
    server.files["a.pth"] = PAYLOAD
    url, dest = f"{server.url}/gate/a.pth", str(tmp_path / "a.pth")
    ctx = multiprocessing.get_context("fork")  # spawn would re-import torch in each child
    procs = [ctx.Process(target=hub.download, args=(url, dest), kwargs={"progress": False})
             for _ in range(2)]
    procs[0].start()
    deadline = time.monotonic() + 30
    while not server.log and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.log, "the first process never reached the server"
    procs[1].start()  # the first one holds the lock and is stuck halfway through the body
    waited = False
    while PROC_LOCKS and time.monotonic() < deadline and procs[1].exitcode is None:
        if _waits_on_lock(procs[1].pid, tmp_path / "a.pth.lock"):
            waited = True
            break
        time.sleep(0.02)
    if not PROC_LOCKS:
        time.sleep(1.0)  # no way to watch the wait: give the second process time to reach it
    server.gate.set()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0]
    assert waited or not PROC_LOCKS, "the second process did not wait on the lock"
    assert server.log == [("/gate/a.pth", None)]  # exactly one GET, a full one
    assert Path(dest).read_bytes() == PAYLOAD


def test_resolve_downloads_into_the_cache_from_a_mirror(server, cache, monkeypatch):
    monkeypatch.setenv(hub.MIRROR_ENV, f"{server.url}/ok/")
    server.files["refcoco+_resnet101_checkpoint.pth"] = PAYLOAD
    path = hub.resolve("mdetr_resnet101_refcocoplus", progress=False, full_download=True)
    assert path == cache / "refcoco+_resnet101_checkpoint.pth"
    assert path.read_bytes() == PAYLOAD
    assert hub.resolve("mdetr_resnet101_refcocoplus") == path
    assert gets(server) == ["/ok/refcoco%2B_resnet101_checkpoint.pth"]


def test_resolve_prefers_an_explicit_checkpoint_which_must_exist(tmp_path):
    f = tmp_path / "mine.pth"
    f.write_bytes(b"x")
    assert hub.resolve("mdetr_clevr", f) == f
    with pytest.raises(FileNotFoundError) as err:
        hub.resolve("mdetr_clevr", tmp_path / "typo.pth")
    assert "typo.pth" in str(err.value)
    with pytest.raises(UnknownNameError):
        hub.resolve("no_such_model", f)


def test_resolve_finds_weights_bundled_in_the_package(monkeypatch):
    bundled = hub.Entry(name="toy", url=None, file="errors.py", architecture="toy", task="detection",
                        description="a bundled file")
    monkeypatch.setattr(hub.catalog, "registry", lambda: {"toy": bundled})
    assert hub.resolve("toy") == Path(hub.__file__).resolve().parent.with_name("errors.py")
    bundled = dataclasses.replace(bundled, file="weights/missing.safetensors")
    with pytest.raises(FileNotFoundError, match="reinstall"):
        hub.resolve("toy")


def _annotations_archive(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path.read_bytes()


def test_resolve_asset_extracts_the_gqa_vocabularies_once(server, cache, tmp_path, monkeypatch):
    monkeypatch.setenv(hub.MIRROR_ENV, f"{server.url}/ok")
    by_type = {"answer_obj": {"yes": 0}, "answer_attr": {"red": 0}}
    server.files["mdetr_annotations.tar.gz"] = _annotations_archive(tmp_path / "a.tar.gz", {
        "mdetr_annotations/final_gqa_train.json": b"[]",
        "mdetr_annotations/gqa_answer2id.json": b'{"yes": 0, "red": 1}',
        "mdetr_annotations/gqa_answer2id_by_type.json": json.dumps(by_type).encode(),
        "../../escape/gqa_answer2id.json": b"must not be written outside the cache",
    })
    path = hub.resolve_asset("gqa_answer2id_by_type", progress=False)
    assert path == cache / "mdetr_annotations" / "gqa_answer2id_by_type.json"
    assert json.loads(path.read_text()) == by_type
    vocab = hub.resolve_asset("gqa_answer2id.json", progress=False)
    assert vocab.parent == path.parent and vocab.is_file()
    assert gets(server) == ["/ok/mdetr_annotations.tar.gz"]  # one download, record 4729015 mirrored
    assert not (tmp_path / "escape").exists()
    assert hub.resolve_asset("mdetr_annotations") == cache / "mdetr_annotations.tar.gz"
    with pytest.raises(UnknownNameError, match="gqa_answer2id_by_type.json"):
        hub.resolve_asset("answers")


def test_a_member_missing_from_the_archive_says_where_else_to_look(server, cache, tmp_path, monkeypatch):
    monkeypatch.setenv(hub.MIRROR_ENV, f"{server.url}/ok")
    server.files["mdetr_annotations.tar.gz"] = _annotations_archive(
        tmp_path / "a.tar.gz", {"mdetr_annotations/final_gqa_train.json": b"[]"})
    with pytest.raises(DownloadError, match="5519755"):
        hub.resolve_asset("gqa_answer2id", progress=False)


# ================================================================ safe loading


class _RunsCode:
    """Unpickling this creates `path`: a stand-in for any payload a hostile file could carry."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _state(offset=0.0):
    g = torch.Generator().manual_seed(0)
    return {
        "backbone.0.body.conv1.weight": torch.randn(64, 3, 7, 7, generator=g) + offset,
        "transformer.encoder.layers.0.linear1.weight": torch.randn(256, 256, generator=g) + offset,
        "transformer.text_encoder.embeddings.position_ids": torch.arange(514).expand(1, -1),
        "class_embed.weight": torch.randn(256, 256, generator=g).t() + offset,  # not contiguous
    }


ARGS = argparse.Namespace(backbone="resnet101", num_queries=100, ema=True, lr=1e-4,
                          text_encoder_type="roberta-base", masks=False, frozen_weights=None,
                          combine_datasets=["refexp"])


def _zenodo_file(path, *, ema=True, big_optimizer=True, **save_kw):
    """A file laid out like the Zenodo checkpoints; Adam's two moments make it 5x the weights."""
    model = _state()
    moments = {i: {"exp_avg": torch.randn(2, *t.shape), "exp_avg_sq": torch.rand(2, *t.shape)}
               for i, t in enumerate(model.values()) if big_optimizer}
    ckpt = {"model": model, "args": ARGS, "epoch": 3,
            "optimizer": {"state": moments, "param_groups": [{"lr": 1e-4, "params": list(range(len(model)))}]}}
    if ema:
        ckpt["model_ema"] = _state(offset=1.0)
    torch.save(ckpt, path, **save_kw)
    return path


def assert_same_state(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_zenodo_file_loads_and_leaves_a_slim_copy(tmp_path):
    src = _zenodo_file(tmp_path / "ckpt.pth")
    state, args = hub.load_weights(src)
    assert_same_state(state, _state())
    assert args == {**vars(ARGS)}
    slim = tmp_path / "ckpt.pth.slim.safetensors"
    assert slim.is_file()
    assert slim.stat().st_size < 0.3 * src.stat().st_size
    assert not list(tmp_path.glob("*.tmp"))


def test_second_load_reads_the_slim_copy(tmp_path):
    src = _zenodo_file(tmp_path / "ckpt.pth")
    first = hub.load_weights(src)
    # Flip bytes inside a weight's record, keeping size, mtime and the zip's central directory:
    # the source now reads differently (or is refused), so only the slim copy can answer.
    st = src.stat()
    with zipfile.ZipFile(src) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
    data = bytearray(src.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)  # local header
    start = info.header_offset + 30 + name_len + extra_len
    data[start:start + 64] = bytes(b ^ 0xFF for b in data[start:start + 64])
    src.write_bytes(data)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    try:
        fresh = hub.read_checkpoint(src)["model"]
        assert not all(torch.equal(fresh[k], v) for k, v in _state().items())
    except CheckpointError:
        pass
    state, args = hub.load_weights(src)
    assert_same_state(state, _state())
    assert args == first[1]


def test_a_replaced_source_makes_the_slim_copy_stale(tmp_path):
    src = _zenodo_file(tmp_path / "ckpt.pth")
    hub.load_weights(src)
    torch.save({"model": _state(offset=5.0), "args": ARGS}, src)
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    state, _ = hub.load_weights(src)
    assert_same_state(state, _state(offset=5.0))


def test_use_ema_picks_the_averaged_weights(tmp_path):
    src = _zenodo_file(tmp_path / "ckpt.pth")
    state, _ = hub.load_weights(src, use_ema=True)
    assert_same_state(state, _state(offset=1.0))
    assert (tmp_path / "ckpt.pth.slim.ema.safetensors").is_file()
    assert_same_state(hub.load_weights(src, use_ema=True)[0], _state(offset=1.0))
    assert_same_state(hub.load_weights(src)[0], _state())  # the two copies do not mix


def test_use_ema_without_ema_weights_lists_what_is_there(tmp_path):
    src = _zenodo_file(tmp_path / "ckpt.pth", ema=False)
    with pytest.raises(CheckpointError) as err:
        hub.load_weights(src, use_ema=True)
    assert "model_ema" in str(err.value)
    for key in ("args", "epoch", "model", "optimizer"):
        assert key in str(err.value)


def test_unwritable_folder_only_skips_the_slim_copy(tmp_path):
    src = _zenodo_file(tmp_path / "ckpt.pth", big_optimizer=False)
    (tmp_path / "ckpt.pth.slim.safetensors").mkdir()  # the rename onto it fails, even as root
    with pytest.warns(UserWarning, match="slim copy"):
        state, args = hub.load_weights(src)
    assert_same_state(state, _state())
    assert args["backbone"] == "resnet101"
    assert not list(tmp_path.glob("*.tmp"))


def test_a_slim_copy_alone_can_be_loaded(tmp_path):
    src = _zenodo_file(tmp_path / "ckpt.pth")
    hub.load_weights(src)
    hub.load_weights(src, use_ema=True)
    src.unlink()  # keep 0.7 GB of weights, not 3 GB of optimizer state
    state, args = hub.load_weights(tmp_path / "ckpt.pth.slim.safetensors")
    assert_same_state(state, _state())
    assert args["backbone"] == "resnet101"
    ema, _ = hub.load_weights(tmp_path / "ckpt.pth.slim.ema.safetensors", use_ema=True)
    assert_same_state(ema, _state(offset=1.0))
    with pytest.raises(CheckpointError, match="EMA"):
        hub.load_weights(tmp_path / "ckpt.pth.slim.safetensors", use_ema=True)
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(CheckpointError, match="broken.safetensors"):
        hub.load_weights(tmp_path / "broken.safetensors")


def test_legacy_format_checkpoints_load_too(tmp_path):
    src = _zenodo_file(tmp_path / "old.pth", big_optimizer=False, _use_new_zipfile_serialization=False)
    assert_same_state(hub.load_weights(src)[0], _state())


def test_code_in_a_pickle_is_refused_and_never_runs(tmp_path):
    sentinel = tmp_path / "pwned"
    hostile = tmp_path / "hostile.pth"
    torch.save({"model": _state(), "args": ARGS, "payload": _RunsCode(sentinel)}, hostile)
    with pytest.raises(CheckpointError) as err:
        hub.load_weights(hostile)
    assert "refused" in str(err.value) and "hostile.pth" in str(err.value)
    assert "executed" in str(err.value)
    assert not sentinel.exists()
    assert not (tmp_path / "hostile.pth.slim.safetensors").exists()
    # Control: the payload is live, unrestricted unpickling would have run it.
    control_sentinel = tmp_path / "control"
    control = tmp_path / "control.pth"
    torch.save({"payload": _RunsCode(control_sentinel)}, control)
    torch.load(control, weights_only=False)
    assert control_sentinel.exists()


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_checkpoint_names_the_file_and_the_fix(tmp_path, legacy):
    src = _zenodo_file(tmp_path / "ckpt.pth", big_optimizer=False,
                       _use_new_zipfile_serialization=not legacy)
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        hub.load_weights(src)
    msg = str(err.value)
    assert str(src) in msg and "truncated or corrupt" in msg and "delete it" in msg


def test_a_file_without_model_weights_is_not_a_checkpoint(tmp_path):
    src = tmp_path / "x.pth"
    torch.save({"state_dict": _state()}, src)
    with pytest.raises(CheckpointError, match="'model'.*state_dict"):
        hub.read_checkpoint(src)
    torch.save([1, 2], src)
    with pytest.raises(CheckpointError, match="list"):
        hub.read_checkpoint(src)


def test_what_the_architecture_fixes_is_derived_not_repeated():
    """backbone, text encoder and query count come from models.FAMILIES (or the entry's own
    config), so checkpoints.json cannot contradict the model that is built."""
    from mdetr_agf.models import FAMILIES as BUILT

    raw = json.loads((Path(hub.__file__).parent.parent / "checkpoints.json").read_text())
    assert not {"backbone", "text_encoder", "num_queries"} & {k for e in raw["models"] for k in e}
    for name, e in hub.registry().items():
        config = BUILT[e.architecture] if e.config is None else e.model_config
        assert (e.backbone, e.text_encoder, e.num_queries) == (config.backbone, config.text_encoder,
                                                               config.num_queries), name
    toy = hub.get_entry("toy")
    assert (toy.backbone, toy.text_encoder, toy.num_queries, toy.input_size) == ("small_cnn_s16", "toy", 8, 160)
    with pytest.raises(TypeError, match="backbone"):
        hub.Entry(name="x", file="x.pth", architecture="mdetr_resnet101", task="detection", description="x",
                  backbone="resnet50")
