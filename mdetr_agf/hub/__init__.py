"""Published checkpoints: which exist (`catalog`), where they live locally (`cache`), how they are
fetched (`download`, or only their weights: `remote_zip`, reading the archive's layout with
`torch_zip`) and opened safely (`checkpoint`).

torch is imported inside the functions that need it, and requests and tqdm only once something
is downloaded: listing and resolving checkpoints stay light.
"""
from .cache import CACHE_ENV, cache_dir, resolve, resolve_asset
from .catalog import MIRROR_ENV, Entry, assets, get_entry, registry, source_url
from .checkpoint import load_weights, read_checkpoint
from .download import download


__all__ = ["CACHE_ENV", "MIRROR_ENV", "Entry", "assets", "cache_dir", "download", "get_entry", "load_weights",
           "read_checkpoint", "registry", "resolve", "resolve_asset", "source_url"]
