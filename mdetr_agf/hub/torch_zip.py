"""What a ``torch.save`` zip archive holds, read without ``torch.load``.

The zip's central directory lists the members (one per tensor storage, stored uncompressed, each
with its CRC-32); ``data.pkl`` says which storages each top-level entry uses. Knowing that is
what lets the weights of a checkpoint be fetched without the optimizer state beside them, and a
downloaded file be checked member by member although no checksum was ever published for it.

``data.pkl`` is read by an unpickler that builds nothing but containers, tensor *records* and
``argparse.Namespace``: the classes torch's weights-only loader allows, minus the few an MDETR
checkpoint never uses. No code from the file runs; anything else stops the reading.
"""
from __future__ import annotations

import _compat_pickle
import argparse
import collections
import io
import pickle
import zipfile
from typing import NamedTuple

from ..errors import CheckpointError

# torch's legacy storage classes, the storage type of every record a torch.save zip holds.
_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
    "UntypedStorage": "uint8",
}


class Unsupported(Exception):
    """The archive needs something this reader does not rebuild (a tensor subclass, another
    global, a big-endian file). Not a verdict on safety: torch's own loader still decides."""


class Storage(NamedTuple):
    key: str  # the member is <archive>/data/<key>
    dtype: str
    numel: int


class TensorRecord(NamedTuple):
    """A tensor as data.pkl describes it: a view (offset, size, stride) of a storage."""

    storage: Storage
    offset: int
    size: tuple
    stride: tuple


class _StorageType(NamedTuple):
    dtype: str


def _ints(value, what) -> tuple:
    if not (isinstance(value, tuple) and all(type(v) is int and v >= 0 for v in value)):
        raise Unsupported(f"a tensor {what} that is not a tuple of sizes: {value!r}")
    return value


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(storage, Storage) or type(offset) is not int or offset < 0 or metadata:
        raise Unsupported("a tensor rebuilt from something other than a plain storage view")
    return TensorRecord(storage, offset, _ints(size, "size"), _ints(stride, "stride"))


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    if not isinstance(data, TensorRecord) or state:
        raise Unsupported("a parameter with extra state")
    return data


def _encode(text, encoding="latin1"):
    """How protocol 2 pickles bytes: _codecs.encode(str, 'latin1')."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise Unsupported("_codecs.encode with other than a latin-1 string")
    return text.encode("latin1")


_ALLOWED = {
    "collections.OrderedDict": collections.OrderedDict,
    "argparse.Namespace": argparse.Namespace,
    "builtins.set": set,
    "builtins.complex": complex,
    "_codecs.encode": _encode,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    **{f"torch.{name}": _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Every global a pickle names goes through find_class, so the table above is the whole
    vocabulary; persistent ids become Storage records instead of loaded storages."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self.storages: dict[str, Storage] = {}

    def find_class(self, module, name):
        if (module, name) in _compat_pickle.NAME_MAPPING:  # protocol 2 writes Python 2 names
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        try:
            return _ALLOWED[f"{module}.{name}"]
        except KeyError:
            raise Unsupported(f"the global {module}.{name}") from None

    def persistent_load(self, pid):
        # torch's protocol: ('storage', storage type, key, location, number of elements)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                and type(pid[4]) is int and pid[4] >= 0):
            raise Unsupported(f"the persistent id {pid!r}")
        record = Storage(pid[2], pid[1].dtype, pid[4])
        known = self.storages.setdefault(record.key, record)
        if known != record:
            raise Unsupported(f"storage {record.key} read with two types")
        return known


class Archive:
    """The members of a torch zip checkpoint and the entries of its data.pkl.

    `fileobj` is any seekable binary file: a local file, or a remote one read with HTTP Range.
    `where` (a path or URL) names the file in errors.
    """

    def __init__(self, fileobj, where: str):
        self.where = where
        try:
            self.zip = zipfile.ZipFile(fileobj)
        except (zipfile.BadZipFile, EOFError, ValueError) as e:
            raise CheckpointError(
                f"{where} is truncated or corrupt: no zip central directory ({e})"
            ) from None
        infos = sorted(self.zip.infolist(), key=lambda i: i.header_offset)
        pkl = [i for i in infos if i.filename.count("/") == 1 and i.filename.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise Unsupported("a zip without exactly one <archive>/data.pkl")
        self.prefix = pkl[0].filename[: -len("data.pkl")]
        self.members = {i.filename: i for i in infos}
        # A member's bytes (local header, data) run up to the next member's header.
        ends = [i.header_offset for i in infos[1:]] + [self.zip.start_dir]
        self.spans = {i.filename: (i.header_offset, end) for i, end in zip(infos, ends)}

    def span(self, name: str) -> tuple[int, int]:
        """The byte range [start, end) of a member in the file."""
        return self.spans[self.prefix + name]

    def has(self, name: str) -> bool:
        return self.prefix + name in self.members

    def read(self, name: str) -> bytes:
        """A member's bytes, CRC-checked by zipfile; a mismatch names the member."""
        info = self.members[self.prefix + name]
        if info.compress_type != zipfile.ZIP_STORED:
            raise Unsupported(f"member {info.filename} is compressed")
        try:
            with self.zip.open(info) as f:
                data = f.read()
        except (zipfile.BadZipFile, EOFError) as e:
            raise CheckpointError(
                f"{self.where} is truncated or corrupt: member {info.filename} "
                f"fails its check ({e})"
            ) from None
        if len(data) != info.file_size:
            raise CheckpointError(
                f"{self.where} is truncated or corrupt: member {info.filename} has "
                f"{len(data)} of its {info.file_size} bytes"
            )
        return data

    def entries(self) -> dict:
        """data.pkl with tensors as TensorRecords: which storages each entry uses."""
        if self.has("byteorder") and self.read("byteorder") != b"little":
            raise Unsupported("a big-endian file")
        try:
            obj = _RestrictedUnpickler(self.read("data.pkl")).load()
        except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError,
                IndexError, KeyError) as e:
            raise Unsupported(f"data.pkl that this reader cannot follow ({e})") from None
        if not isinstance(obj, dict):
            raise Unsupported(f"data.pkl holding a {type(obj).__name__}, not a dict")
        return obj

    def storage_member(self, storage: Storage) -> str:
        """The member name (relative to the archive prefix) of a storage, checked to exist."""
        name = f"data/{storage.key}"
        if not self.has(name):
            raise CheckpointError(f"{self.where} is truncated or corrupt: member "
                                  f"{self.prefix}{name} is missing")
        return name

    def tensor(self, record: TensorRecord, cache: dict):
        """The tensor of a record; `cache` (key -> storage tensor) keeps shared storages shared."""
        import torch

        storage = record.storage
        base = cache.get(storage.key)
        if base is None:
            dtype = getattr(torch, storage.dtype)
            data = self.read(self.storage_member(storage))
            itemsize = torch.empty((), dtype=dtype).element_size()
            if len(data) != storage.numel * itemsize:
                raise CheckpointError(
                    f"{self.where} is truncated or corrupt: member {self.prefix}data/"
                    f"{storage.key} has {len(data)} bytes for {storage.numel} {storage.dtype}s"
                )
            # bytearray: a writable, aligned copy (the bytes read are neither, necessarily)
            raw = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else \
                torch.empty(0, dtype=torch.uint8)
            base = cache[storage.key] = raw.view(dtype)
        try:
            return torch.as_strided(base, record.size, record.stride, record.offset)
        except RuntimeError as e:
            raise CheckpointError(
                f"{self.where} is corrupt: a tensor of {self.prefix}data/{storage.key} "
                f"reaches outside its storage ({e})"
            ) from None


def storages(value) -> list[Storage]:
    """The storages a (nested) entry uses, each once, in first-use order."""
    found: dict[str, Storage] = {}
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, TensorRecord):
            found.setdefault(v.storage.key, v.storage)
        elif isinstance(v, dict):
            stack.extend(reversed(list(v.values())))
        elif isinstance(v, (list, tuple, set)) and not isinstance(v, (Storage, TensorRecord)):
            stack.extend(reversed(list(v)))
        elif isinstance(v, argparse.Namespace):
            stack.extend(reversed(list(vars(v).values())))
    return list(found.values())


def check_file(path, keys=("model",)) -> None:
    """Raise CheckpointError if a zip checkpoint has no central directory, or if data.pkl or
    a storage that one of `keys` uses fails its CRC-32.

    What the reader does not follow (legacy non-zip files, unusual globals) is left to
    torch's weights-only loader, which refuses what is unsafe.
    """
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return  # not a zip: the legacy format, read (and judged) by torch.load
        f.seek(0)
        archive = Archive(f, str(path))
        try:
            entries = archive.entries()
        except Unsupported:
            return
        for key in keys:
            for storage in storages(entries.get(key)):
                archive.read(archive.storage_member(storage))
