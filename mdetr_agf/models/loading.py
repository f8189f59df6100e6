"""``load_model``: the one door from a checkpoint name (or file) to a ready model."""
import torch

from .. import hub
from ..errors import CheckpointError, InputError
from .build import FAMILIES, ModelConfig, build_model

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


def config_for(entry):
    if "config" in entry:
        return ModelConfig.from_dict(entry["config"])
    return FAMILIES[entry["architecture"]]


def check_device(device):
    """``device`` as a torch.device that exists on this machine (checked by allocating on it)."""
    if isinstance(device, (torch.device, str, int)) and not isinstance(device, bool):
        name = str(device) if isinstance(device, torch.device) else device
    else:
        raise InputError(f"device must be a name such as 'cpu' or 'cuda:0', got {type(device).__name__} {device!r}")
    gpus = torch.cuda.device_count()
    here = "cpu" + (f", cuda:0 … cuda:{gpus - 1}" if gpus else "")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, NotImplementedError) as exc:
        reason = (str(exc).strip() or type(exc).__name__).splitlines()[0].split(". ")[0]
        raise InputError(f"device {name!r} is not usable here ({reason[:100]}); devices on this machine: {here}") \
            from None
    return device


def load_model(name, checkpoint=None, device=None, use_ema=False, progress=True):
    """Build ``name``'s architecture and load its weights.

    ``checkpoint``: a local file in the Zenodo format (or its slim safetensors copy); when
    absent the entry's file is downloaded into the cache (``MDETR_AGF_CACHE``) once.
    ``use_ema``: read the ``model_ema`` weights where the file has them.
    """
    device = None if device is None else check_device(device)
    entry = hub.get_entry(name)
    config = config_for(entry)
    path = hub.resolve(name, checkpoint, progress=progress)
    state, _args = hub.load_weights(path, use_ema=use_ema)
    model = build_model(config)
    model.load_state_dict(_check_keys(model, state, entry.get("architecture", name), path))
    model.name = name
    # Preprocessing size (shorter side, px) the model was trained at; None: MDETR's 800.
    model.input_size = entry.get("input_size")
    if device is not None:
        model.to(device)
    return model.eval()
