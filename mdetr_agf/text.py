"""Tokenizers and the bookkeeping between caption characters and token positions.

MDETR encodes captions with RoBERTa's byte-level BPE (``roberta-base``; ``distilroberta-base``
for CLEVR), whose ids are ``<s>=0, <pad>=1, </s>=2, <unk>=3``. Its box heads predict, per query,
a distribution over 256 token positions, and its ground truth ties phrases to *character* spans
of the caption. Everything here is therefore about offsets: which token positions cover a
character span, and which character spans a set of positions covers.

Offline use matters (tests, air-gapped clusters), so :func:`train_tokenizer` builds a tiny
tokenizer that behaves like RoBERTa's (same special ids, same ``<s> ... </s>`` framing, same
offset trimming) from a handful of captions, and :func:`load_tokenizer` fails with a
:class:`~mdetr_agf.errors.DownloadError` that says how to fix it rather than silently building
an empty vocabulary (which ``from_pretrained`` does in transformers 5 when files are missing).
"""
from __future__ import annotations

import functools
import os
import re
import tempfile
from collections.abc import Iterable, Sequence

from transformers import BatchEncoding, PreTrainedTokenizerFast, RobertaTokenizerFast

from .errors import DownloadError, InputError, InputTypeError, UnknownNameError

#: RoBERTa's special tokens, in id order: <s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4.
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
#: Number of token positions MDETR's contrastive/soft-token logits cover.
MAX_POSITIONS = 256
#: Files a tokenizer directory needs: tokenizer.json alone, or vocab.json with merges.txt.
_HUB_FILES = ["tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
              "special_tokens_map.json", "config.json"]


def _has_tokenizer_files(directory: str) -> bool:
    present = set(os.listdir(directory))
    return "tokenizer.json" in present or {"vocab.json", "merges.txt"} <= present


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _offline() -> bool:
    """Offline mode read at call time: huggingface_hub reads HF_HUB_OFFLINE only at import."""
    from huggingface_hub import constants

    return constants.is_offline_mode() or _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else with separators is meant as a path.
    return (name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1
            or os.path.isabs(name))


def load_tokenizer(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None
                   ) -> PreTrainedTokenizerFast:
    """Load a RoBERTa tokenizer from a local directory or a Hub name ("roberta-base", ...).

    Loaded tokenizers are cached per (resolved name, cache_dir); call ``load_tokenizer.cache_clear()``
    after rewriting a directory in place. Hub files are taken from the Hugging Face cache when
    there, and downloaded otherwise unless ``HF_HUB_OFFLINE=1`` (honoured even when set after
    import). ``cache_dir`` overrides the Hugging Face cache location.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise InputTypeError(f"load_tokenizer needs a Hub name such as 'roberta-base' or a directory "
                             f"path, got {type(name_or_path).__name__}: {name_or_path!r}")
    name = os.fspath(name_or_path)
    if not name.strip():
        raise InputError("load_tokenizer got an empty name; pass a Hub name such as 'roberta-base' "
                         "or a directory saved with tokenizer.save_pretrained(dir)")
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        name = os.path.realpath(expanded)
    elif os.path.exists(expanded) or _looks_like_path(name):
        raise InputError(f"load_tokenizer({name!r}): no such directory; pass a directory containing "
                         f"tokenizer.json (or vocab.json and merges.txt), or a Hub name such as 'roberta-base'")
    cache = None if cache_dir is None else os.path.realpath(os.fspath(cache_dir))
    return _load_cached(name, cache, _offline())


@functools.lru_cache(maxsize=16)
def _load_cached(name: str, cache_dir: str | None, offline: bool) -> PreTrainedTokenizerFast:
    if os.path.isdir(name):
        if not _has_tokenizer_files(name):
            raise InputError(f"directory {name!r} holds no tokenizer: it needs tokenizer.json, or "
                             f"vocab.json and merges.txt (found: {sorted(os.listdir(name))})")
        return RobertaTokenizerFast.from_pretrained(name)
    directory = _download(name, cache_dir, offline)
    return RobertaTokenizerFast.from_pretrained(directory)


def _download(name: str, cache_dir: str | None, offline: bool) -> str:
    """Fetch (or find in the cache) the tokenizer files of Hub repo ``name``; return their folder."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    where = cache_dir or constants.HF_HUB_CACHE
    needed = f"vocab.json and merges.txt (or tokenizer.json) from https://huggingface.co/{name}"
    fixes = ("To fix: connect to the internet once so the files are cached; or download them into a "
             "folder and pass it as load_model(..., tokenizer=FOLDER) (command line: --tokenizer FOLDER; "
             "a tokenizer.save_pretrained(folder) folder works too); or point HF_HOME/HF_HUB_CACHE at a "
             "cache that has them and set HF_HUB_OFFLINE=1.")
    try:
        directory = snapshot_download(name, cache_dir=cache_dir, local_files_only=offline,
                                      allow_patterns=_HUB_FILES)
    except RepositoryNotFoundError as exc:
        raise UnknownNameError(f"there is no tokenizer {name!r} on the Hugging Face Hub; MDETR uses "
                               f"'roberta-base' (or 'distilroberta-base' for CLEVR)") from exc
    except Exception as exc:  # network, offline mode, missing cache entry, HTTP errors
        why = ("downloads are disabled because HF_HUB_OFFLINE is set" if offline
               else "downloading them failed")
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise DownloadError(f"load_tokenizer({name!r}) needs {needed}; they are not in the Hugging Face "
                            f"cache {where} and {why} ({type(exc).__name__}: {detail}). {fixes}") from exc
    if not _has_tokenizer_files(directory):
        raise DownloadError(f"load_tokenizer({name!r}): the cached copy in {directory} lacks {needed}. {fixes}")
    return directory


load_tokenizer.cache_clear = _load_cached.cache_clear  # type: ignore[attr-defined]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1000, min_frequency: int = 1
                    ) -> RobertaTokenizerFast:
    """Train a small byte-level BPE tokenizer that behaves like RoBERTa's.

    Same special ids (<s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4), the same ``<s> ... </s>``
    framing, ``add_prefix_space=False`` and trimmed offsets, so code written against
    roberta-base (positive maps, phrase spans) runs unchanged on toy data without downloads.
    The byte alphabet is always included, so no text maps to <unk>.
    """
    from tokenizers import ByteLevelBPETokenizer

    if isinstance(texts, (str, bytes)) or not isinstance(texts, Iterable):
        raise InputTypeError(f"train_tokenizer needs an iterable of strings, got {type(texts).__name__}")
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise InputTypeError(f"train_tokenizer: texts[{bad[0]}] is {type(texts[bad[0]]).__name__}; only str is allowed")
    if not any(t.strip() for t in texts):
        raise InputError("train_tokenizer needs at least one non-empty text")
    if not isinstance(vocab_size, int) or vocab_size < 256 + len(SPECIAL_TOKENS):
        raise InputError(f"vocab_size must be an int >= {256 + len(SPECIAL_TOKENS)} "
                         f"(256 bytes + special tokens), got {vocab_size!r}")
    if not isinstance(min_frequency, int) or min_frequency < 1:
        raise InputError(f"min_frequency must be an int >= 1, got {min_frequency!r}")
    bpe = ByteLevelBPETokenizer(add_prefix_space=False, trim_offsets=True)
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                            show_progress=False, special_tokens=list(SPECIAL_TOKENS))
    with tempfile.TemporaryDirectory() as tmp:
        bpe.save_model(tmp)  # vocab.json + merges.txt; RobertaTokenizerFast adds the post-processor
        tokenizer = RobertaTokenizerFast.from_pretrained(tmp, add_prefix_space=False, trim_offsets=True,
                                                         model_max_length=512)
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3, 4]
    return tokenizer


def _check_captions(captions) -> list[str]:
    if isinstance(captions, str):
        raise InputTypeError(f"captions must be a list of strings, got a single str {captions[:60]!r}; "
                             f"wrap it in a list: [caption]")
    if not isinstance(captions, Sequence):
        raise InputTypeError(f"captions must be a list of non-empty strings, got {type(captions).__name__}")
    if len(captions) == 0:
        raise InputError("captions is empty; pass a list with at least one non-empty string")
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise InputTypeError(f"captions[{i}] is {type(caption).__name__} ({caption!r:.60}); "
                                 f"each caption must be a non-empty str")
        if not caption.strip():
            raise InputError(f"captions[{i}] is {caption!r}: empty or whitespace-only; "
                             f"each caption must contain some text")
        try:
            caption.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate, e.g. from bytes decoded with surrogateescape
            raise InputError(f"captions[{i}] is not valid Unicode: {caption[exc.start:exc.end]!r} at character "
                             f"{exc.start} is a lone surrogate, which no tokenizer can encode; pass text that "
                             f"encodes as UTF-8") from None
    return list(captions)


def tokenize(tokenizer: PreTrainedTokenizerFast, captions: Sequence[str],
             max_positions: int = MAX_POSITIONS) -> BatchEncoding:
    """Tokenize a batch of captions for MDETR: padded to the longest, PyTorch tensors, with offsets.

    A caption longer than ``max_positions`` token positions (special tokens included) is refused
    rather than truncated: MDETR's logits cover 256 positions, and truncating would silently drop
    the phrases the caption's boxes are tied to.
    """
    if not callable(tokenizer) or not getattr(tokenizer, "is_fast", False):
        raise InputTypeError(f"tokenize needs a fast (tokenizers-backed) tokenizer such as load_tokenizer() "
                             f"returns, got {type(tokenizer).__name__}")
    captions = _check_captions(captions)
    if isinstance(max_positions, bool) or not isinstance(max_positions, int) or max_positions < 3:
        raise InputError(f"max_positions must be an int >= 3, got {max_positions!r}")
    encoding = tokenizer(captions, padding="longest", return_tensors="pt", return_offsets_mapping=True)
    lengths = encoding["attention_mask"].sum(dim=1).tolist()
    for i, n in enumerate(lengths):
        if n > max_positions:
            raise InputError(f"captions[{i}] ({captions[i][:50]!r}...) is {n} tokens long including <s> and "
                             f"</s>; the model covers at most {max_positions} token positions; shorten the caption")
    return encoding


def _offsets(encoding: BatchEncoding, batch_index: int) -> list[tuple[int, int]]:
    if "offset_mapping" not in encoding:
        raise InputError("encoding has no offset_mapping; create it with tokenize() "
                         "(return_offsets_mapping=True)")
    rows = encoding["offset_mapping"]
    if isinstance(batch_index, bool) or not isinstance(batch_index, int):
        raise InputTypeError(f"batch_index must be an int, got {type(batch_index).__name__}")
    if not -len(rows) <= batch_index < len(rows):
        raise InputError(f"batch_index {batch_index} is out of range for a batch of {len(rows)} captions")
    row = rows[batch_index]
    row = row.tolist() if hasattr(row, "tolist") else row
    return [(int(s), int(e)) for s, e in row]


def char_span_to_tokens(encoding: BatchEncoding, batch_index: int, start: int, end: int) -> list[int]:
    """Token positions whose characters overlap ``caption[start:end]``, in order.

    Special and padding tokens (empty offsets) never match. Partial overlap counts, so a span
    cutting a word in half still gets the word's token (as MDETR's positive maps do).
    """
    if not (isinstance(start, int) and isinstance(end, int)) or not 0 <= start < end:
        raise InputError(f"need 0 <= start < end for a character span, got ({start!r}, {end!r})")
    return [i for i, (s, e) in enumerate(_offsets(encoding, batch_index)) if e > s and s < end and e > start]


def tokens_to_char_spans(encoding: BatchEncoding, batch_index: int, token_ids) -> list[tuple[int, int]]:
    """Character spans covered by the given token positions, runs of adjacent positions merged.

    ``token_ids`` are positions in the row (not vocabulary ids). Positions of special or padding
    tokens cover no characters and are skipped. E.g. positions 1,2 ("the", " red") -> [(0, 7)].
    """
    offsets = _offsets(encoding, batch_index)
    positions = []
    for t in (token_ids.tolist() if hasattr(token_ids, "tolist") else token_ids):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < len(offsets):
            raise InputError(f"token position {t!r} is out of range for a row of {len(offsets)} tokens")
        positions.append(t)
    spans: list[tuple[int, int]] = []
    previous = None
    for t in sorted(set(positions)):
        s, e = offsets[t]
        if e <= s:
            continue
        if previous is not None and t == previous + 1 and spans:
            spans[-1] = (spans[-1][0], max(spans[-1][1], e))
        else:
            spans.append((s, e))
        previous = t
    return spans


def phrase_tokens(encoding: BatchEncoding, caption: str, phrase: str, batch_index: int = 0) -> list[int]:
    """Token positions covering the first case-insensitive occurrence of ``phrase`` in ``caption``."""
    for label, value in (("caption", caption), ("phrase", phrase)):
        if not isinstance(value, str):
            raise InputTypeError(f"{label} must be a str, got {type(value).__name__}")
        if not value.strip():
            raise InputError(f"{label} is {value!r}: empty or whitespace-only")
    offsets = _offsets(encoding, batch_index)
    if max(e for _, e in offsets) > len(caption):
        raise InputError(f"encoding row {batch_index} covers more characters than caption {caption!r}; "
                         f"pass the caption that row was tokenized from")
    match = re.search(re.escape(phrase), caption, flags=re.IGNORECASE)
    if match is None:
        raise UnknownNameError(f"phrase {phrase!r} does not occur in caption {caption!r}")
    return char_span_to_tokens(encoding, batch_index, match.start(), match.end())
