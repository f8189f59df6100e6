"""Sharing a job between the processes ``torchrun`` starts, on one machine or several.

:func:`join` enters the process group torchrun describes in the environment (gloo on the CPU,
NCCL on GPUs, each rank on its own GPU) and gives a single-process :class:`Group` when there is
no torchrun. :func:`run_items` scores a list of items once across the group: item ``i`` of the
items still to do goes to rank ``i % world_size``, each rank streams every finished item's
record to rank 0 through the rendezvous store (no shared disk needed), and rank 0 appends each
record to a JSON-lines journal as it arrives, shows one progress bar over the global count, and
gets every record back in item order — so what it computes from them does not depend on how
many processes shared the work. A rerun with the same journal skips the items it holds.

A rank whose scoring raises posts its error to the store and exits; rank 0 raises it
(:class:`~mdetr_agf.errors.WorkerError`) at its next check. A rank killed outright is stopped
by torchrun, which ends the others; a rank on another machine that stops answering is noticed
by its missing heartbeat.
"""
from __future__ import annotations

import json
import os
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import InputError, WorkerError

#: Seconds between a rank's heartbeats, and the silence after which rank 0 gives up on it.
HEARTBEAT_S, SILENCE_S = 2.0, 120.0
_POLL_S = 0.05


@dataclass
class Group:
    """Where this process stands in the job: its rank, how many share the work, its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    store: object = None  # the rendezvous store's own namespace for this package (None: one process)

    @property
    def main(self) -> bool:
        return self.rank == 0


def join(device: str | torch.device | None = None) -> Group:
    """The torchrun job this process belongs to (a one-process group outside torchrun).

    ``device``: "cpu" or "cuda"; under torchrun "cuda" becomes ``cuda:LOCAL_RANK`` (one GPU per
    rank), and the backend is NCCL for CUDA, gloo for the CPU.
    """
    device = torch.device(device or "cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Group(device=device)
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    store, rank, world = next(dist.rendezvous("env://"))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.PrefixStore("process_group", store),
                            rank=rank, world_size=world)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # a restarted job's keys start afresh
    return Group(rank, world, device, dist.PrefixStore(f"mdetr_agf/{attempt}", store))


def leave(group: Group) -> None:
    import torch.distributed as dist

    if group.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- the journal


def read_journal(path: Path, header: dict) -> dict[int, dict]:
    """The records a journal holds, by item index; {} when it does not exist yet. A line cut
    off by a preempted write is dropped (that item is scored again)."""
    if not path.exists() or path.stat().st_size == 0:
        return {}
    lines = path.read_text().splitlines()
    try:
        written = json.loads(lines[0])["journal"] if lines else None
    except (json.JSONDecodeError, KeyError, TypeError):
        written = None
    if written != header:
        raise InputError(f"{path} is the journal of another job ({written}), not of this one ({header}); "
                         "pass another --journal, or delete it to start over")
    done = {}
    for k, line in enumerate(lines[1:], start=2):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if k == len(lines):
                break
            raise InputError(f"{path}, line {k}, is not JSON; delete the journal to start over") from None
        done[record["index"]] = record
    return done


class _Journal:
    def __init__(self, path: Path | None, header: dict, fresh: bool):
        self.file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists():  # drop a line a preempted write cut off: it is scored again
                text = path.read_bytes()
                if text and not text.endswith(b"\n"):
                    path.write_bytes(text[: text.rfind(b"\n") + 1])
            self.file = open(path, "a")
            if fresh:
                self.write({"journal": header})

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self):
        if self.file is not None:
            self.file.close()


# ---------------------------------------------------------------- scoring items across ranks


def run_items(group: Group, items: Sequence, score: Callable[[int, object], dict], *, header: dict,
              journal: str | Path | None = None, progress: bool = True, desc: str = "items") -> list[dict] | None:
    """Every item's record, in item order, on rank 0 (None on the other ranks).

    ``score(index, item)`` returns a JSON-serializable dict, the item's record (``index`` is
    added). ``header``: the job's arguments that decide the records; a journal written with
    other ones is refused, and every rank must have been started with the same ones.
    """
    journal = None if journal is None else Path(journal)
    done = read_journal(journal, header) if journal is not None and group.main else {}
    pending = [i for i in range(len(items)) if i not in done]
    if group.world_size > 1:
        pending = _agree(group, header, pending)
    mine = pending[group.rank::group.world_size]
    if not group.main:
        _serve(group, items, mine, score)
        return None
    records = {i: r for i, r in done.items() if i < len(items)}
    log = _Journal(journal, header, fresh=journal is not None and (not journal.exists() or journal.stat().st_size == 0))
    bar = tqdm(total=len(items), initial=len(records), disable=not progress, desc=desc, dynamic_ncols=True)
    watch = _Watch(group) if group.world_size > 1 else None

    def keep(record):
        records[record["index"]] = record
        log.write(record)
        bar.update(1)

    try:
        for index in mine:
            keep(_scored(score, index, items[index]))
            if watch:
                for record in watch.arrived():
                    keep(record)
        while watch and len(records) < len(items):
            got = watch.arrived()
            for record in got:
                keep(record)
            if not got:
                time.sleep(_POLL_S)
        if watch:
            group.store.set("finished", "1")
    except BaseException as exc:
        if watch:
            group.store.set("failed", f"rank 0: {type(exc).__name__}: {exc}")
        raise
    finally:
        bar.close()
        log.close()
    return [records[i] for i in range(len(items))]


def _scored(score, index, item) -> dict:
    """The item's record as it reads back from JSON, whichever rank computed it."""
    return json.loads(json.dumps({"index": index, **score(index, item)}))


def _agree(group: Group, header: dict, pending: list[int]) -> list[int]:
    """Check that every rank runs the same job, and hand rank 0's list of items to do to all."""
    import torch.distributed as dist

    headers = [None] * group.world_size
    dist.all_gather_object(headers, header)
    if any(h != header for h in headers):
        raise InputError(f"the ranks were started with different arguments: {headers}; start every rank "
                         "with the same command")
    box = [pending]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _serve(group: Group, items, mine: list[int], score) -> None:
    """A rank other than 0: score its share, push each record to rank 0, beat while alive."""
    store, stop = group.store, threading.Event()

    def beat():
        while not stop.wait(HEARTBEAT_S):
            store.add(f"beat/{group.rank}", 1)

    beating = threading.Thread(target=beat, daemon=True)
    beating.start()
    try:
        for index in mine:
            _raise_if_failed(store)
            try:
                record = _scored(score, index, items[index])
            except BaseException as exc:
                store.set("failed", f"rank {group.rank}, item {index}: {type(exc).__name__}: {exc}\n"
                                    + traceback.format_exc())
                raise
            store.queue_push("records", json.dumps(record))
        while not store.check(["finished"]):  # rank 0 may still read this rank's records
            _raise_if_failed(store)
            time.sleep(10 * _POLL_S)
    finally:
        stop.set()


def _raise_if_failed(store) -> None:
    if store.check(["failed"]):
        raise WorkerError(f"another process of this job failed: {store.get('failed').decode()}")


class _Watch:
    """Rank 0's view of the others: records that arrived, an error one of them posted, silence."""

    def __init__(self, group: Group):
        self.store, self.others = group.store, range(1, group.world_size)
        now = time.monotonic()
        self.beats = {r: (0, now) for r in self.others}

    def arrived(self) -> list[dict]:
        _raise_if_failed(self.store)
        now = time.monotonic()
        for r in self.others:
            count = self.store.add(f"beat/{r}", 0)
            last, since = self.beats[r]
            if count != last:
                self.beats[r] = (count, now)
            elif now - since > SILENCE_S:
                raise WorkerError(f"rank {r} has not answered for {SILENCE_S:.0f} s (its machine or process is "
                                  "gone); the journal keeps what was finished: rerun the same command to resume")
        return [json.loads(self.store.queue_pop("records", False)) for _ in range(self.store.queue_len("records"))]
