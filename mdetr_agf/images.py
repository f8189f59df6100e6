"""Turning whatever a user holds into MDETR's input: a PIL image, a path, a URL or a tensor.

MDETR was trained on RGB images resized so the shorter side is 800 px and the longer at most
1333 px, normalized with ImageNet's mean and std. Everything else a user may paste —
grayscale, palette, RGBA, 16-bit, CMYK, EXIF-rotated photos — is converted first.
"""
import errno
import io
import os
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DownloadError, FileMissingError, InputError, InputTypeError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def url_timeout():
    """Seconds to wait for an image URL (connect and each read): $MDETR_AGF_URL_TIMEOUT or 20."""
    return float(os.environ.get("MDETR_AGF_URL_TIMEOUT", 20))


def resized_shape(width, height, size=800, max_size=1333):
    """MDETR's rule: shorter side → ``size`` unless the longer side would exceed ``max_size``."""
    short, long = min(width, height), max(width, height)
    if long / short * size > max_size:
        size = max(1, int(round(max_size * short / long)))
    if width < height:
        return max(1, int(size * height / width)), size
    return size, max(1, int(size * width / height))


def _to_rgb(image):
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale the full range to 8 bits instead of clipping it.
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = np.zeros_like(arr) if hi == lo else (arr - lo) / (hi - lo) * 255.0
        image = Image.fromarray(arr.round().astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def _fetch_url(url):
    import requests

    timeout = url_timeout()
    try:
        response = requests.get(url, timeout=timeout)
        response.raise_for_status()
    except requests.RequestException as exc:
        raise DownloadError(f"could not fetch image {url} (timeout {timeout:g} s): {exc}") from exc
    return io.BytesIO(response.content)


def load_image(image):
    """A PIL RGB image from a PIL image, a path or an http(s) URL."""
    if isinstance(image, Image.Image):
        return _to_rgb(image)
    if isinstance(image, (str, Path)):
        source = str(image)
        if source.startswith(("http://", "https://")):
            stream = _fetch_url(source)
        elif not Path(source).is_file():
            raise FileMissingError(errno.ENOENT, f"no image file at {source!r}", source)
        else:
            stream = source
        try:
            with Image.open(stream) as opened:
                opened.load()
                return _to_rgb(opened)
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f"{source!r} is not an image PIL can read ({exc}); use a JPEG, PNG, …") from exc
    raise InputTypeError(
        f"image must be a PIL image, a path, a URL or a 3×H×W tensor, not {type(image).__name__}")


def check_tensor(image):
    """A normalized 3×H×W float tensor, checked for rank and finiteness."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise InputError(f"an image tensor must be 3×H×W (normalized RGB), got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise InputTypeError(f"an image tensor must be floating point, got {image.dtype}")
    if not torch.isfinite(image).all():
        raise InputError("the image tensor contains NaN or infinite values")
    if min(image.shape[-2:]) < 1:
        raise InputError(f"the image tensor is empty: shape {tuple(image.shape)}")
    return image


def prepare(image, size=800, max_size=1333):
    """Returns (normalized 3×h×w tensor, original (width, height)). Tensors pass as they are."""
    if isinstance(image, torch.Tensor):
        image = check_tensor(image)
        return image, (int(image.shape[-1]), int(image.shape[-2]))
    pil = load_image(image)
    width, height = pil.size
    h, w = resized_shape(width, height, size, max_size)
    tensor = TF.to_tensor(pil.resize((w, h), Image.BILINEAR))
    return TF.normalize(tensor, MEAN, STD), (width, height)


def denormalize(tensor):
    """Normalized 3×H×W tensor → H×W×3 float array in [0, 1], for display."""
    mean = torch.tensor(MEAN, device=tensor.device).view(3, 1, 1)
    std = torch.tensor(STD, device=tensor.device).view(3, 1, 1)
    return (tensor * std + mean).clamp(0, 1).permute(1, 2, 0).cpu().numpy()
