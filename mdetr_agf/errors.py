"""Typed errors: every failure a user can cause names what was wrong and what is allowed.

Each class derives from a builtin (ValueError, TypeError, LookupError, OSError, RuntimeError) so callers
can catch the familiar type, and from MdetrAgfError so they can catch everything of ours.
"""


class MdetrAgfError(Exception):
    """Base of every error this package raises on purpose."""


class InputError(MdetrAgfError, ValueError):
    """An image, caption, tensor or option has a value we cannot use."""


class InputTypeError(MdetrAgfError, TypeError):
    """An argument has a type we cannot use."""


class UnknownNameError(MdetrAgfError, LookupError):
    """A model, method, query, token or phrase that does not exist."""


class CheckpointError(MdetrAgfError, ValueError):
    """A checkpoint file is unsafe, truncated, or of another architecture."""


class DownloadError(MdetrAgfError, OSError):
    """A download failed (HTTP error, timeout, checksum mismatch, disk full)."""


class FileMissingError(MdetrAgfError, FileNotFoundError):
    """A file the user named (image, checkpoint, tokenizer folder) does not exist."""


class ModelBusyError(MdetrAgfError, RuntimeError):
    """A model was used again from inside one of its own explanations or predictions."""


class CacheError(MdetrAgfError, OSError):
    """The cache folder cannot be used: not a folder, not writable, or not safely owned."""


class WorkerError(MdetrAgfError, RuntimeError):
    """Another process of a job shared with torchrun failed or stopped answering."""


class ResumeError(MdetrAgfError, ValueError):
    """A training checkpoint was written by a run with other options, so this run cannot resume it."""
