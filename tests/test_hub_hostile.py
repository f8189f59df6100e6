"""A hostile cache, URL, archive, server or checkpoint: nothing written outside the cache, no
write through a planted link, no unbounded wait, size or recursion, no stale or damaged copy
trusted, no silently broken weights, and a read-only location is no failure.

Everything is real: files and links on disk, a server on 127.0.0.1 (from test_hub), tar and
zip files written byte by byte, processes holding locks, and read-only tmpfs mounts.
"""
from __future__ import annotations

import argparse
import gzip
import io
import multiprocessing
import os
import subprocess
import tarfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from mdetr_agf import hub
from mdetr_agf.cli import main
from mdetr_agf.errors import CacheError, CheckpointError, DownloadError, InputError, MdetrAgfError
from test_hub import ARGS, PAYLOAD, _annotations_archive, _state, _zenodo_file, assert_same_state, gets
from test_hub import server  # noqa: F401  (the fixture)

VICTIM_TEXT = b"a file outside the cache that must not change\n"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv(hub.CACHE_ENV, str(path))
    return path


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "outside" / "victim.txt"
    path.parent.mkdir()
    path.write_bytes(VICTIM_TEXT)
    return path


# ================================================================ tmpfs mounts


def _mount(*args) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@contextmanager
def tmpfs(path: Path, size: str = "8m"):
    """A real tmpfs at `path`, yielding a function that remounts it read-only; unmounted after."""
    path.mkdir(parents=True, exist_ok=True)
    if not _mount("-t", "tmpfs", "-o", f"size={size},mode=755", "tmpfs", str(path)):
        yield None
        return
    try:
        yield lambda: _mount("-o", "remount,ro", str(path)) or pytest.fail("remount ro failed")
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextmanager
def read_only_folder(path: Path):
    """A folder this process cannot write to, filled by `fill(path)` before it is sealed.

    Preferred: a tmpfs remounted read-only (writes fail with EROFS, as on a read-only dataset
    mount). Where mounting is not permitted and the tests run as an ordinary user, the honest
    equivalent is a folder without write permission (EACCES). Root without mount rights has
    no way to make a folder unwritable to itself, so only then does the test skip.
    """
    with tmpfs(path) as seal:
        if seal is not None:
            yield seal
            return
        if os.getuid() == 0:
            pytest.skip("root without permission to mount a tmpfs: no folder can be made "
                        "unwritable to this process")
        path.mkdir(exist_ok=True)
        try:
            yield lambda: path.chmod(0o555)
        finally:
            path.chmod(0o755)


# ================================================================ 1. names from URLs


@pytest.mark.parametrize("name", ["..%2F..%2Fescaped.pth", "%2e%2e", "sub%2Fescaped.pth",
                                  "..%5Cescaped.pth", "%00escaped.pth"])
def test_a_url_name_that_decodes_to_a_path_is_refused(server, cache, tmp_path, name):
    from urllib.parse import unquote

    server.files[unquote(name)] = PAYLOAD
    with pytest.raises(InputError) as err:
        hub.download(f"{server.url}/ok/{name}", progress=False)
    assert "not a plain file name" in str(err.value) and "dest=" in str(err.value)
    assert gets(server) == []  # refused before any request
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    assert list(cache.iterdir()) == []


def test_a_plain_url_name_still_lands_in_the_cache(server, cache):
    server.files["refcoco+_x.pth"] = PAYLOAD
    assert hub.download(f"{server.url}/ok/refcoco%2B_x.pth", progress=False) == cache / "refcoco+_x.pth"


def test_registry_entries_naming_paths_are_refused(cache, tmp_path, monkeypatch):
    entry = hub.Entry(name="bad", url="https://zenodo.org/record/1/files/x.pth", file="../escaped.pth",
                      architecture="mdetr_resnet101", task="detection", description="a file name leaving its folder")
    monkeypatch.setattr(hub.catalog, "registry", lambda: {"bad": entry})
    with pytest.raises(InputError, match="registry entry"):
        hub.resolve("bad")
    asset = {"name": "../up", "url": "https://zenodo.org/record/1/files/a.tar.gz",
             "file": "a.tar.gz", "members": ["m.json"]}
    monkeypatch.setattr(hub.cache, "assets", lambda: {"../up": asset})
    with pytest.raises(InputError, match="asset name"):
        hub.resolve_asset("m.json")
    assert not (tmp_path / "escaped.pth").exists() and not (tmp_path / "up").exists()


# ================================================================ 2. planted links, foreign folders


def test_a_planted_part_link_is_not_written_through(server, cache, victim):
    server.files["a.pth"] = PAYLOAD
    cache.mkdir()
    (cache / "a.pth.part").symlink_to(victim)
    with pytest.raises(DownloadError) as err:
        hub.download(f"{server.url}/ok/a.pth", progress=False)
    assert "symbolic link" in str(err.value) and "not followed" in str(err.value)
    assert victim.read_bytes() == VICTIM_TEXT
    assert not (cache / "a.pth").exists()


def test_a_hard_linked_part_is_not_appended_to(server, cache, victim):
    server.files["a.pth"] = PAYLOAD
    cache.mkdir()
    os.link(victim, cache / "a.pth.part")
    with pytest.raises(DownloadError, match="hard links"):
        hub.download(f"{server.url}/ok/a.pth", progress=False)
    assert victim.read_bytes() == VICTIM_TEXT


def test_a_planted_lock_link_creates_nothing(server, cache, tmp_path):
    server.files["a.pth"] = PAYLOAD
    cache.mkdir()
    target = tmp_path / "outside-created"
    (cache / "a.pth.lock").symlink_to(target)
    with pytest.raises(DownloadError, match="symbolic link"):
        hub.download(f"{server.url}/ok/a.pth", progress=False)
    assert not target.exists()


def test_extraction_never_writes_through_planted_links(server, cache, victim, tmp_path, monkeypatch):
    monkeypatch.setenv(hub.MIRROR_ENV, f"{server.url}/ok")
    server.files["mdetr_annotations.tar.gz"] = _annotations_archive(tmp_path / "a.tar.gz", {
        "mdetr_annotations/gqa_answer2id.json": b'{"yes": 0}',
        "mdetr_annotations/gqa_answer2id_by_type.json": b'{"answer_obj": {"yes": 0}}'})
    folder = cache / "mdetr_annotations"
    folder.mkdir(parents=True)
    # Under another member's final name, and under the temporary names an earlier version used.
    (folder / "gqa_answer2id.json").symlink_to(victim)
    for base in ("gqa_answer2id.json", "gqa_answer2id_by_type.json"):
        (folder / f".{base}.{os.getpid()}.tmp").symlink_to(victim)
    path = hub.resolve_asset("gqa_answer2id_by_type", progress=False)
    assert path.read_bytes() == b'{"answer_obj": {"yes": 0}}'
    replaced = folder / "gqa_answer2id.json"  # extracted in the same pass: the link replaced
    assert not replaced.is_symlink() and replaced.read_bytes() == b'{"yes": 0}'
    assert victim.read_bytes() == VICTIM_TEXT


def test_an_extraction_folder_that_is_a_link_is_refused(server, cache, tmp_path, monkeypatch):
    monkeypatch.setenv(hub.MIRROR_ENV, f"{server.url}/ok")
    server.files["mdetr_annotations.tar.gz"] = _annotations_archive(tmp_path / "a.tar.gz", {
        "mdetr_annotations/gqa_answer2id.json": b'{"yes": 0}'})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cache.mkdir()
    (cache / "mdetr_annotations").symlink_to(elsewhere)
    with pytest.raises(CacheError, match="symbolic link"):
        hub.resolve_asset("gqa_answer2id", progress=False)
    assert list(elsewhere.iterdir()) == []


def test_a_planted_slim_temp_link_is_not_written_through(tmp_path, victim):
    src = _zenodo_file(tmp_path / "ckpt.pth", big_optimizer=False)
    (tmp_path / f"ckpt.pth.slim.safetensors.{os.getpid()}.tmp").symlink_to(victim)
    state, _ = hub.load_weights(src)
    assert_same_state(state, _state())
    assert victim.read_bytes() == VICTIM_TEXT
    assert (tmp_path / "ckpt.pth.slim.safetensors").is_file()


def test_a_cache_folder_open_to_every_user_is_refused(cache):
    cache.mkdir(mode=0o755)
    cache.chmod(0o777)
    with pytest.raises(CacheError) as err:
        hub.cache_dir()
    assert str(cache) in str(err.value) and "writable by every user" in str(err.value)
    assert hub.CACHE_ENV in str(err.value)


def test_a_cache_folder_of_another_user_is_refused(cache, monkeypatch):
    if os.getuid() == 0:
        cache.mkdir()
        os.chown(cache, 54321, 54321)
    else:  # an ordinary user: a folder root owns is another user's
        monkeypatch.setenv(hub.CACHE_ENV, "/")
        cache = Path("/")
    with pytest.raises(CacheError, match="owned by another user"):
        hub.resolve("mdetr_clevr", progress=False)
    assert isinstance(CacheError(), OSError) and isinstance(CacheError(), MdetrAgfError)


def test_no_slim_copy_is_kept_or_trusted_in_a_folder_every_user_can_write(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    src = _zenodo_file(shared / "ckpt.pth", big_optimizer=False)
    # A planted slim copy with other weights but the right size/mtime stamp in its metadata.
    from safetensors.torch import save_file

    st = src.stat()
    save_file(_packed(_state(offset=9.0)), str(shared / "ckpt.pth.slim.safetensors"), metadata={
        "format_version": "mdetr_agf.slim/1", "key": "model", "source_size": str(st.st_size),
        "source_mtime_ns": str(st.st_mtime_ns)})
    shared.chmod(0o1777)
    with pytest.warns(UserWarning, match="writable by every user"):
        state, _ = hub.load_weights(src)
    assert_same_state(state, _state())


# ================================================================ 3. sizes and waits


def _packed(state):
    return {k: v.contiguous() for k, v in state.items()}


def _gz_tar(blocks: list[bytes]) -> bytes:
    return gzip.compress(b"".join(blocks) + b"\0" * 1024, compresslevel=1)


def _sparse_member(name: str, real_size: int) -> bytes:
    """An old-GNU sparse member: one 512-byte data block, then `real_size` bytes of holes."""
    info = tarfile.TarInfo(name)
    info.size, info.type = 512, tarfile.GNUTYPE_SPARSE
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[386:410] = tarfile.itn(0, 12, tarfile.GNU_FORMAT) + tarfile.itn(512, 12, tarfile.GNU_FORMAT)
    header[483:495] = tarfile.itn(real_size, 12, tarfile.GNU_FORMAT)
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header[:512])
    return bytes(header) + b"x" * 512


def _serve_annotations(server, monkeypatch, archive: bytes):
    monkeypatch.setenv(hub.MIRROR_ENV, f"{server.url}/ok")
    server.files["mdetr_annotations.tar.gz"] = archive


def test_a_member_declaring_10_gib_is_refused_before_any_byte(server, cache, monkeypatch):
    info = tarfile.TarInfo("mdetr_annotations/gqa_answer2id.json")
    info.size = 10 << 30
    archive = _gz_tar([info.tobuf(tarfile.GNU_FORMAT), b"{" * 4096])  # the rest never sent
    assert len(archive) < 10_000
    _serve_annotations(server, monkeypatch, archive)
    t0 = time.monotonic()
    with pytest.raises(DownloadError) as err:
        hub.resolve_asset("gqa_answer2id", progress=False)
    assert time.monotonic() - t0 < 10
    msg = str(err.value)
    assert "declares 10737418240 bytes" in msg and "MDETR_AGF_MAX_MEMBER_BYTES" in msg
    assert not any(p.is_file() for p in (cache / "mdetr_annotations").rglob("*"))


def test_a_sparse_member_expanding_to_10_gib_is_refused(server, cache, monkeypatch):
    archive = _gz_tar([_sparse_member("mdetr_annotations/gqa_answer2id.json", 10 << 30)])
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:  # it really is a 10 GiB member
        assert tar.getmembers()[0].size == 10 << 30
    _serve_annotations(server, monkeypatch, archive)
    with pytest.raises(DownloadError, match="more than the limit"):
        hub.resolve_asset("gqa_answer2id", progress=False)
    assert not any(p.is_file() for p in (cache / "mdetr_annotations").rglob("*"))


def test_the_member_limit_is_read_from_the_environment(server, cache, monkeypatch):
    archive = _gz_tar([_sparse_member("mdetr_annotations/gqa_answer2id.json", 64 << 20)])
    _serve_annotations(server, monkeypatch, archive)
    monkeypatch.setenv("MDETR_AGF_MAX_MEMBER_BYTES", str(16 << 20))
    with pytest.raises(DownloadError, match=f"limit of {16 << 20}"):
        hub.resolve_asset("gqa_answer2id", progress=False)
    monkeypatch.setenv("MDETR_AGF_MAX_MEMBER_BYTES", str(64 << 20))  # raised: extracted
    path = hub.resolve_asset("gqa_answer2id", progress=False)
    assert path.stat().st_size == 64 << 20
    monkeypatch.setenv("MDETR_AGF_MAX_MEMBER_BYTES", "lots")
    with pytest.raises(InputError, match="MDETR_AGF_MAX_MEMBER_BYTES"):
        hub.resolve_asset("gqa_answer2id_by_type", progress=False)


def test_a_one_byte_per_second_server_is_stopped_by_the_deadline(server, tmp_path, monkeypatch):
    server.files["a.pth"] = b"0123456789" * 3
    monkeypatch.setenv("MDETR_AGF_DOWNLOAD_DEADLINE", "1.5")
    t0 = time.monotonic()
    with pytest.raises(DownloadError) as err:
        hub.download(f"{server.url}/trickle/a.pth", tmp_path / "a.pth", progress=False, timeout=5)
    took = time.monotonic() - t0
    assert 1.4 < took < 4, took  # each byte came within the read timeout; the total did not
    assert "1.5 s" in str(err.value) and "MDETR_AGF_DOWNLOAD_DEADLINE" in str(err.value)
    assert not (tmp_path / "a.pth").exists()
    assert 0 < (tmp_path / "a.pth.part").stat().st_size < 30  # kept for resuming


def test_headers_sent_one_byte_at_a_time_are_stopped_by_the_deadline(server, tmp_path):
    server.files["a.pth"] = PAYLOAD
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match="longer than the limit of 1.5 s"):
        hub.download(f"{server.url}/slowheaders/a.pth", tmp_path / "a.pth", progress=False,
                     timeout=5, deadline=1.5)
    assert time.monotonic() - t0 < 4
    assert not (tmp_path / "a.pth").exists()


def test_a_cut_body_without_a_length_is_not_taken_for_the_whole_file(server, tmp_path):
    server.files["a.pth"] = PAYLOAD[:40]
    with pytest.raises(DownloadError, match="longer than the limit"):
        hub.download(f"{server.url}/trickle-nolength/a.pth", tmp_path / "a.pth", progress=False,
                     timeout=5, deadline=1.2)
    assert not (tmp_path / "a.pth").exists()


def _hold_lock_while_stalled(url, dest):
    hub.download(url, dest, progress=False, timeout=60)


def test_a_hung_lock_holder_is_named_after_the_wait_limit(server, tmp_path, monkeypatch):
    server.files["a.pth"] = PAYLOAD
    url, dest = f"{server.url}/stall/a.pth", tmp_path / "a.pth"
    holder = multiprocessing.get_context("fork").Process(target=_hold_lock_while_stalled,
                                                         args=(url, dest))
    holder.start()
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "a.pth.part").exists() and time.monotonic() < deadline:
            time.sleep(0.02)  # the holder has the lock and is stuck in the body
        assert (tmp_path / "a.pth.part").exists(), "the holder never started"
        monkeypatch.setenv("MDETR_AGF_LOCK_WAIT", "1")
        t0 = time.monotonic()
        with pytest.raises(DownloadError) as err:
            hub.download(url, dest, progress=False)
        assert time.monotonic() - t0 < 5
        msg = str(err.value)
        assert str(tmp_path / "a.pth.lock") in msg and f"pid {holder.pid}" in msg
        assert "MDETR_AGF_LOCK_WAIT" in msg
        assert len(gets(server)) == 1  # the waiter never downloaded
    finally:
        server.release.set()
        holder.terminate()
        holder.join(10)


def test_a_full_disk_fails_cleanly_and_leaves_no_file(server, tmp_path):
    """A 1 MB tmpfs: the kernel's real ENOSPC, on a body whose length was not announced."""
    server.files["a.pth"] = PAYLOAD
    with tmpfs(tmp_path / "small", size="1m") as mounted:
        if mounted is None:
            pytest.skip("needs permission to mount a small tmpfs to fill a disk")
        with pytest.raises(DownloadError) as err:
            hub.download(f"{server.url}/nolength/a.pth", tmp_path / "small" / "a.pth", progress=False)
        assert "disk full" in str(err.value)
        assert not (tmp_path / "small" / "a.pth").exists()


# ================================================================ 4. hostile training options


def _save_with_args(path, args, **kw):
    torch.save({"model": _state(), "args": args}, path, **kw)
    return path


def test_shared_references_in_args_cannot_explode(tmp_path):
    bomb = [0]
    for _ in range(40):  # 2**40 leaves as JSON, a few hundred bytes as a pickle
        bomb = [bomb, bomb]
    src = _save_with_args(tmp_path / "ckpt.pth", argparse.Namespace(backbone="resnet101", bomb=bomb))
    plain = _save_with_args(tmp_path / "plain.pth", argparse.Namespace(backbone="resnet101"))
    assert src.stat().st_size - plain.stat().st_size < 10_000
    t0 = time.monotonic()
    with pytest.warns(UserWarning, match="bomb.*dropped.*MDETR_AGF_ARGS_MAX_BYTES"):
        state, args = hub.load_weights(src)
    assert time.monotonic() - t0 < 20
    assert args == {"backbone": "resnet101"}
    assert_same_state(state, _state())
    assert hub.load_weights(src)[1] == args  # the slim copy keeps the same options


def test_a_self_referencing_list_in_args_is_dropped(tmp_path):
    loop = []
    loop.append(loop)
    src = _save_with_args(tmp_path / "ckpt.pth", {"backbone": "resnet101", "loop": loop})
    with pytest.warns(UserWarning, match="loop"):
        _, args = hub.load_weights(src)
    assert args == {"backbone": "resnet101"}


def test_deeply_nested_args_give_no_recursion_error(tmp_path):
    """The pickle is edited by hand: torch.save itself cannot write 100 000 levels."""
    depth = 100_000
    marker = "M" * (2 * depth - 6)  # BINUNICODE + length + text: as long as the nesting opcodes
    src = _save_with_args(tmp_path / "deep.pth", {"backbone": "resnet101", "deep": marker},
                          _use_new_zipfile_serialization=False)
    data = src.read_bytes()
    opcode = b"X" + len(marker).to_bytes(4, "little") + marker.encode()
    assert data.count(opcode) == 1
    src.write_bytes(data.replace(opcode, b"]" * depth + b"a" * (depth - 1)))
    with pytest.warns(UserWarning, match="deep.*deeper than 32"):
        _, args = hub.load_weights(src)
    assert args == {"backbone": "resnet101"}
    nested = torch.load(src, weights_only=True)["args"]["deep"]  # control: it is that deep
    for _ in range(depth - 1):
        nested = nested[0]
    assert nested == []


def test_ordinary_args_come_through_unchanged(tmp_path):
    src = _save_with_args(tmp_path / "ckpt.pth", ARGS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hub.load_weights(src)[1] == vars(ARGS)


# ================================================================ 5. stale copies, broken weights


def test_a_same_size_same_mtime_replacement_is_not_served_stale(tmp_path):
    src = _save_with_args(tmp_path / "ckpt.pth", ARGS)
    hub.load_weights(src)
    st = src.stat()
    (tmp_path / "new").mkdir()  # same file name: torch names the zip's members after it
    torch.save({"model": _state(offset=5.0), "args": ARGS}, tmp_path / "new" / "ckpt.pth")
    os.replace(tmp_path / "new" / "ckpt.pth", src)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (src.stat().st_size, src.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    state, _ = hub.load_weights(src)
    assert_same_state(state, _state(offset=5.0))


def test_a_damaged_slim_copy_is_rebuilt(tmp_path):
    from safetensors.torch import save_file

    src = _zenodo_file(tmp_path / "ckpt.pth", big_optimizer=False)
    slim = tmp_path / "ckpt.pth.slim.safetensors"
    save_file(_packed(_state(offset=3.0)), str(slim), metadata={"order": "[not json", "args": "{"})
    state, _ = hub.load_weights(src)
    assert_same_state(state, _state())
    assert_same_state(hub.load_weights(slim)[0], _state())  # rebuilt, readable
    slim.write_bytes(b"\xff" * 100)  # and plain garbage
    assert_same_state(hub.load_weights(src)[0], _state())


def _toy_file_with(tmp_path, change):
    from safetensors.torch import save_file

    from mdetr_agf.hub.catalog import PACKAGE_DIR

    state, args = hub.load_weights(PACKAGE_DIR / hub.get_entry("toy").file)
    key = change(state)
    path = tmp_path / "toy_broken.safetensors"
    save_file(state, str(path))
    return path, key


def _first_float(state):
    return next(k for k, v in state.items() if v.is_floating_point() and v.dim() > 1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_key(tmp_path, bad):
    from mdetr_agf import load_model

    def poison(state):
        key = list(k for k, v in state.items() if v.is_floating_point())[5]
        state[key] = state[key].clone()
        state[key].view(-1)[3] = bad
        return key

    path, key = _toy_file_with(tmp_path, poison)
    with pytest.raises(CheckpointError) as err:
        load_model("toy", checkpoint=path)
    assert repr(key) in str(err.value) and "NaN or infinite" in str(err.value)


def test_integer_weights_are_refused_naming_the_key(tmp_path):
    from mdetr_agf import load_model

    def to_int(state):
        key = _first_float(state)
        state[key] = state[key].round().to(torch.int32)
        return key

    path, key = _toy_file_with(tmp_path, to_int)
    with pytest.raises(CheckpointError) as err:
        load_model("toy", checkpoint=path)
    assert repr(key) in str(err.value) and "torch.int32" in str(err.value)


# ================================================================ 6. read-only places


def test_a_checkpoint_on_a_read_only_mount_loads_without_a_slim_copy(tmp_path):
    ro = tmp_path / "ro"
    with read_only_folder(ro) as seal:
        src = _zenodo_file(ro / "ckpt.pth", big_optimizer=False)
        seal()
        with pytest.raises(OSError):
            (ro / "probe").write_bytes(b"")  # the folder really is unwritable
        with pytest.warns(UserWarning, match="no slim copy"):
            state, args = hub.load_weights(src)
        assert_same_state(state, _state())
        assert args["backbone"] == "resnet101"
        assert sorted(p.name for p in ro.iterdir()) == ["ckpt.pth"]


def test_a_read_only_cache_serves_what_it_holds_and_refuses_downloads_clearly(
        server, tmp_path, monkeypatch, capsys):
    ro = tmp_path / "ro"
    monkeypatch.setenv(hub.CACHE_ENV, str(ro))
    monkeypatch.setenv(hub.MIRROR_ENV, f"{server.url}/ok")
    server.files["clevr_checkpoint.pth"] = PAYLOAD
    with read_only_folder(ro) as seal:
        (ro / hub.get_entry("mdetr_clevr_humans").file).write_bytes(b"weights")
        seal()
        held = hub.resolve("mdetr_clevr_humans", progress=False)
        assert held.read_bytes() == b"weights"
        with pytest.raises(DownloadError) as err:
            hub.resolve("mdetr_clevr", progress=False)
        assert "not writable" in str(err.value) and hub.CACHE_ENV in str(err.value)
        assert main(["models"]) == 0
        out = capsys.readouterr().out
        assert f"cache: {ro}" in out
        assert [line.split()[-1] for line in out.splitlines() if "clevr_humans" in line] == ["yes"]
    # A cache that cannot be created on a read-only mount: a typed error, also from the CLI.
    with read_only_folder(ro) as seal:
        seal()
        monkeypatch.setenv(hub.CACHE_ENV, str(ro / "sub"))
        with pytest.raises(CacheError, match="cannot create the cache folder"):
            hub.cache_dir()


def test_a_cache_path_that_is_a_file_is_a_typed_error_also_for_the_cli(tmp_path, monkeypatch, capsys):
    f = tmp_path / "not-a-folder"
    f.write_text("x")
    for path in (f, f / "sub"):
        monkeypatch.setenv(hub.CACHE_ENV, str(path))
        with pytest.raises(CacheError) as err:
            hub.cache_dir()
        assert str(path) in str(err.value) and hub.CACHE_ENV in str(err.value)
        for argv in (["models"], ["download", "mdetr_clevr"]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert err.startswith("mdetr-agf: error: ") and err.count("\n") == 1
            assert hub.CACHE_ENV in err and str(path) in err


def _bytes_read() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


@pytest.mark.skipif(not Path("/proc/self/io").is_file(), reason="needs Linux's /proc/self/io to count bytes read")
def test_the_fingerprint_reads_the_central_directory_only(tmp_path):
    # 2400 members, as many as a Zenodo file's weights, EMA weights and Adam moments together.
    src = tmp_path / "many.pth"
    torch.save({"model": {f"layer{i}.weight": torch.zeros(4) for i in range(2399)},
                "big": torch.zeros(16 << 20)}, src)
    assert src.stat().st_size > 64 << 20
    before = _bytes_read()
    fingerprint = hub.checkpoint.source_fingerprint(src)
    read = _bytes_read() - before
    assert fingerprint.startswith("zip-cd:") and read < 1 << 20, read
    assert hub.checkpoint.source_fingerprint(src) == fingerprint
