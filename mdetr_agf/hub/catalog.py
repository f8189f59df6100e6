"""Published checkpoints and assets: `checkpoints.json` is the one place that names them.

Adding a model means adding an entry there, not code. An entry names its architecture; what
the architecture fixes (backbone, text encoder, number of queries) is read from
`models.FAMILIES` (or the entry's own `config`), never repeated in the file.
`$MDETR_AGF_MIRROR` points every Zenodo URL at one other folder (an offline site, a test server).
"""
from __future__ import annotations

import copy
import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UnknownNameError

MIRROR_ENV = "MDETR_AGF_MIRROR"
PACKAGE_DIR = Path(__file__).resolve().parent.parent
_REGISTRY_FILE = PACKAGE_DIR / "checkpoints.json"


@functools.lru_cache(maxsize=1)
def _registry_file() -> dict:
    with open(_REGISTRY_FILE, encoding="utf-8") as f:
        return json.load(f)


@dataclass(frozen=True)
class Entry:
    """One published (or bundled) checkpoint of checkpoints.json."""

    name: str
    file: str  # the file name on Zenodo and in the cache; bundled: its path inside the package
    architecture: str  # a key of models.FAMILIES, or a name of the entry's own `config`
    task: str
    description: str
    url: str | None = None  # None: bundled with the package
    metric: dict = field(default_factory=dict)  # {"name": ..., "value": ...}: the published headline
    size: str = ""
    sha256: str | None = None  # of the whole file; None: not yet pinned (see checkpoints.json)
    input_size: int | None = None  # shorter image side it was trained at; None: MDETR's 800
    config: dict | None = None  # a ModelConfig as a dict, for architectures outside FAMILIES

    @property
    def model_config(self):
        """The ``ModelConfig`` that builds this entry's model (imports torch)."""
        from ..models.build import FAMILIES, ModelConfig

        return ModelConfig.from_dict(self.config) if self.config is not None else FAMILIES[self.architecture]

    @property
    def backbone(self) -> str:
        return self.model_config.backbone

    @property
    def text_encoder(self) -> str:
        return self.model_config.text_encoder

    @property
    def num_queries(self) -> int:
        return self.model_config.num_queries


def registry() -> dict[str, Entry]:
    """Model name -> entry of checkpoints.json (parsed once; callers get their own copy)."""
    return {e["name"]: Entry(**copy.deepcopy(e)) for e in _registry_file()["models"]}


def assets() -> dict[str, dict]:
    """Non-model files the models need (e.g. the GQA answer vocabularies), by name."""
    return {e["name"]: copy.deepcopy(e) for e in _registry_file().get("assets", [])}


def get_entry(name: str) -> Entry:
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
