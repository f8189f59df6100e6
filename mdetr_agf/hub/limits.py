"""The bounds that keep a hostile server, archive or checkpoint from exhausting the machine.

Each has a named default, generous for the published files, and an environment variable to
raise it (the matching function argument, where there is one, wins over both).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import InputError


@dataclass(frozen=True)
class Limit:
    env: str
    default: float
    unit: str

    def get(self, override: float | None = None) -> float:
        """`override` if given, else $env, else the default; always a positive number."""
        if override is not None:
            value, source = override, "the argument"
        else:
            raw = os.environ.get(self.env)
            if raw is None or not raw.strip():
                return self.default
            source = f"${self.env}"
            try:
                value = float(raw)
            except ValueError:
                value = None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 \
                or value != value:
            raise InputError(
                f"{source} must be a positive number of {self.unit} (default {self.default:g}); "
                f"got {value if source == 'the argument' else os.environ.get(self.env)!r}"
            )
        return float(value)


# Bytes of one file extracted from an archive, declared in its header and actually written.
# The largest member the package extracts (a RefCOCO validation file) is well under 100 MB.
MEMBER_BYTES = Limit("MDETR_AGF_MAX_MEMBER_BYTES", float(1 << 30), "bytes")
# Seconds one download call may take in all (each read has its own, shorter timeout). A call
# stopped by it keeps its bytes: the next call resumes. 3 GB at 250 kB/s fits in 4 hours.
DOWNLOAD_DEADLINE = Limit("MDETR_AGF_DOWNLOAD_DEADLINE", 4 * 3600.0, "seconds")
# Seconds to wait for another process's download lock while that process writes nothing.
LOCK_WAIT = Limit("MDETR_AGF_LOCK_WAIT", 600.0, "seconds")
# A checkpoint's training options (`args`) as plain data: nesting depth and JSON size. MDETR's
# are a flat namespace of about 100 options, 3 kB of JSON.
ARGS_DEPTH = Limit("MDETR_AGF_ARGS_MAX_DEPTH", 32.0, "levels")
ARGS_BYTES = Limit("MDETR_AGF_ARGS_MAX_BYTES", float(1 << 20), "bytes")
