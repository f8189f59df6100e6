"""``load_model``: the one door from a checkpoint name (or file) to a ready model."""
import errno
import os

import torch

from .. import hub
from ..errors import CheckpointError, FileMissingError, InputError, InputTypeError
from .build import FAMILIES, build_model
from .mdetr import core

# Entries that differ between the published files and this implementation without meaning
# anything: RoBERTa's position-id buffer (recomputed from the ids) and batch-norm counters.
BENIGN_SUFFIXES = (".position_ids", ".num_batches_tracked")


def guess_family(keys, shapes):
    """Which of the eight layouts a state dict looks like, from a few tell-tale entries."""
    prefix = "detr." if any(k.startswith("detr.") for k in keys) else ""
    proj = shapes.get(prefix + "input_proj.weight")
    if proj is None:
        return None
    channels = proj[1]
    qa = shapes.get(prefix + "qa_embed.weight")
    if qa is not None and qa[0] == 4:
        return "mdetr_clevr"
    backbone = {2048: "resnet101", 384: "efficientnetB3", 512: "efficientnetB5"}.get(channels)
    if backbone is None:
        return None
    suffix = "_phrasecut" if prefix else "_gqa" if qa is not None else ""
    name = f"mdetr_{backbone}{suffix}"
    return name if name in FAMILIES else None


def _check_keys(model, state, config_name, path):
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if k in expected or not k.endswith(BENIGN_SUFFIXES)}
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    wrong_shape = sorted(k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong_shape:
        looks_like = guess_family(list(state), {k: tuple(v.shape) for k, v in state.items()})
        hint = (f"the file looks like architecture {looks_like!r}" if looks_like
                else "the file matches none of the known MDETR architectures")
        def show(keys):
            return ", ".join(keys[:8]) + (f" … (+{len(keys) - 8} more)" if len(keys) > 8 else "") or "none"
        raise CheckpointError(
            f"{path} does not fit architecture {config_name!r}: {hint}.\n"
            f"  missing keys ({len(missing)}): {show(missing)}\n"
            f"  unexpected keys ({len(unexpected)}): {show(unexpected)}\n"
            f"  shape mismatches ({len(wrong_shape)}): {show(wrong_shape)}\n"
            "Pass the checkpoint to the model name it was published for (see `mdetr-agf models`)."
        )
    return state


def _check_values(model, state, path):
    """Every floating entry of the model must get finite floating values: an integer tensor
    would be cast silently, and NaN or inf give NaN maps or no detections, with no error."""
    expected = model.state_dict()
    for k, v in state.items():
        if k not in expected or not expected[k].is_floating_point():
            continue
        if not v.is_floating_point():
            raise CheckpointError(
                f"{path}: {k!r} holds {v.dtype} values where the model has a floating parameter "
                f"({expected[k].dtype}); the file is damaged or not a model checkpoint"
            )
        if not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise CheckpointError(
                f"{path}: {k!r} (the first such entry) has {bad} NaN or infinite value(s) of "
                f"{v.numel()}; the weights are damaged (a diverged training run?): use another "
                "checkpoint"
            )


def check_device(device):
    """``device`` as a ``torch.device`` (or None), refused before any download when this torch cannot use it."""
    if device is None or isinstance(device, torch.device):
        chosen = device
    elif isinstance(device, str):
        try:
            chosen = torch.device(device)
        except RuntimeError:
            raise InputError(f"device {device!r} is not a device torch knows; use 'cpu', 'cuda', 'cuda:N' "
                             "or 'mps'") from None
    else:
        raise InputTypeError(f"device must be a str such as 'cpu' or 'cuda', or a torch.device, got "
                             f"{type(device).__name__}")
    kind = None if chosen is None else chosen.type
    if kind == "cuda" and not torch.cuda.is_available():
        why = (f"this torch ({torch.__version__}, built for CUDA {torch.version.cuda}) sees no GPU: no driver, or "
               "CUDA_VISIBLE_DEVICES hides it" if torch.version.cuda else
               f"this torch ({torch.__version__}) is a CPU-only build")
        raise InputError(f"device {str(device)!r} asks for a CUDA GPU, but {why}; use device 'cpu'")
    if kind == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise InputError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                         "numbered from 0")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device {str(device)!r} asks for Apple's MPS, which this torch cannot use; use 'cpu'")
    return chosen


def attach_tokenizer(model, loaded, tokenizer):
    """Give ``model`` the tokenizer ``loaded`` from ``tokenizer``, if its ids fit the text encoder."""
    detr = core(model)
    rows = detr.transformer.text_encoder.embeddings.word_embeddings.num_embeddings
    if len(loaded) > rows:
        raise InputError(f"tokenizer {os.fspath(tokenizer)!r} has {len(loaded)} tokens, but the model's text "
                         f"encoder embeds only {rows}; pass the tokenizer the checkpoint was trained with "
                         f"({detr.config.tokenizer or detr.config.text_encoder!r})")
    detr.tokenizer = loaded
    return model


def load_model(name, checkpoint=None, device=None, use_ema=False, progress=True, tokenizer=None,
               full_download=False):
    """Build ``name``'s architecture and load its weights.

    ``checkpoint``: a local file in the Zenodo format (or its slim safetensors copy); when
    absent the weights are fetched into the cache (``MDETR_AGF_CACHE``) once: only the bytes
    of the weights, unless ``full_download`` keeps the whole file (optimizer state included).
    ``device``: ``"cpu"`` (what ``None`` leaves it on), ``"cuda"``, ``"cuda:1"``, ``"mps"``;
    checked before anything is downloaded.
    ``use_ema``: read the ``model_ema`` weights where the file has them.
    ``tokenizer``: a local folder holding the caption tokenizer (``tokenizer.json``, or
    ``vocab.json`` and ``merges.txt``, as ``save_pretrained`` writes), used instead of fetching
    the one the checkpoint names (``roberta-base`` / ``distilroberta-base``) from the
    Hugging Face hub; a Hub name works too.
    """
    device = check_device(device)
    entry = hub.get_entry(name)
    if tokenizer is not None:  # a wrong folder is reported before a download, not after
        from ..text import load_tokenizer

        if isinstance(tokenizer, os.PathLike) and not os.path.isdir(tokenizer):
            raise FileMissingError(errno.ENOENT, "tokenizer folder not found; pass a folder holding "
                                   "tokenizer.json (or vocab.json and merges.txt)", os.fspath(tokenizer))
        loaded = load_tokenizer(tokenizer)
    config = entry.model_config
    path = hub.resolve(name, checkpoint, progress=progress, use_ema=use_ema, full_download=full_download)
    state, _args = hub.load_weights(path, use_ema=use_ema)
    model = build_model(config)
    state = _check_keys(model, state, entry.architecture, path)
    _check_values(model, state, path)
    model.load_state_dict(state)
    model.name = name
    # Preprocessing size (shorter side, px) the model was trained at; None: MDETR's 800.
    model.input_size = entry.input_size
    if tokenizer is not None:
        attach_tokenizer(model, loaded, tokenizer)
    if device is not None:
        model.to(device)
    return model.eval()
