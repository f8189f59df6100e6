"""Published checkpoints and assets: `checkpoints.json` is the one place that names them.

Adding a model means adding an entry there, not code. `$MDETR_AGF_MIRROR` points every Zenodo
URL at one other folder (an offline site, a test server).
"""
from __future__ import annotations

import copy
import functools
import json
import os
import re
from pathlib import Path

from ..errors import UnknownNameError

MIRROR_ENV = "MDETR_AGF_MIRROR"
PACKAGE_DIR = Path(__file__).resolve().parent.parent
_REGISTRY_FILE = PACKAGE_DIR / "checkpoints.json"


@functools.lru_cache(maxsize=1)
def _registry_file() -> dict:
    with open(_REGISTRY_FILE, encoding="utf-8") as f:
        return json.load(f)


def registry() -> dict[str, dict]:
    """Model name -> entry of checkpoints.json (parsed once; callers get their own copy)."""
    return {e["name"]: copy.deepcopy(e) for e in _registry_file()["models"]}


def assets() -> dict[str, dict]:
    """Non-model files the models need (e.g. the GQA answer vocabularies), by name."""
    return {e["name"]: copy.deepcopy(e) for e in _registry_file().get("assets", [])}


def get_entry(name: str) -> dict:
    """The registry entry of `name`; an unknown name lists the valid ones."""
    models = registry()
    try:
        return models[name]
    except (KeyError, TypeError):
        raise UnknownNameError(
            f"no checkpoint named {name!r}; known names: {', '.join(sorted(models))}"
        ) from None


def source_url(url: str) -> str:
    """Apply $MDETR_AGF_MIRROR: one folder holding the Zenodo files under their own names.

    It replaces the `https://zenodo.org/record/<id>/files/` prefix of every registry URL
    (the checkpoints' record 4721981 and the annotations' record), so an offline site or a
    test needs one server, not one per record.
    """
    mirror = os.environ.get(MIRROR_ENV)
    m = re.match(r"https://zenodo\.org/records?/\d+/files/", url)
    if mirror and m:
        return mirror.rstrip("/") + "/" + url[m.end():]
    return url
