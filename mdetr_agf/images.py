"""Turning whatever a user holds into MDETR's input: a PIL image, a path, a URL or a tensor.

MDETR was trained on RGB images resized so the shorter side is 800 px and the longer at most
1333 px, normalized with ImageNet's mean and std. Everything else a user may paste —
grayscale, palette, RGBA, 16-bit, CMYK, EXIF-rotated photos — is converted first.
"""
import errno
import io
import math
import os
import threading
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DownloadError, FileMissingError, InputError, InputTypeError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

#: Seconds to wait for an image server to connect or send the next data ($MDETR_AGF_URL_TIMEOUT).
URL_TIMEOUT_S = 20.0
#: Seconds an image download may take in all, however the server trickles ($MDETR_AGF_IMAGE_DEADLINE).
IMAGE_DEADLINE_S = 60.0
#: Largest image download, in bytes, after decompression ($MDETR_AGF_IMAGE_MAX_BYTES): 64 MiB.
IMAGE_MAX_BYTES = 64 * 2**20


def _env_limit(name, default):
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not number > 0 or math.isinf(number):
        raise InputError(f"${name} must be a positive number, got {value!r} (default {default:g})")
    return number


def url_timeout():
    """Seconds to wait for an image URL to connect or send more data: $MDETR_AGF_URL_TIMEOUT or 20."""
    return _env_limit("MDETR_AGF_URL_TIMEOUT", URL_TIMEOUT_S)


def image_deadline():
    """Seconds an image download may take in all: $MDETR_AGF_IMAGE_DEADLINE or 60."""
    return _env_limit("MDETR_AGF_IMAGE_DEADLINE", IMAGE_DEADLINE_S)


def image_max_bytes():
    """Bytes an image download may hold: $MDETR_AGF_IMAGE_MAX_BYTES or 64 MiB."""
    return int(_env_limit("MDETR_AGF_IMAGE_MAX_BYTES", IMAGE_MAX_BYTES))


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
    """The body of an image URL, bounded in bytes and in total time.

    The download runs in a worker thread the caller waits for at most the deadline: a server
    that trickles its headers or body a byte at a time cannot hold the call longer. A worker
    left behind stops at its next chunk (or when the server's headers end or time out).
    """
    timeout, deadline, limit = url_timeout(), image_deadline(), image_max_bytes()
    result, cancelled = {}, threading.Event()
    worker = threading.Thread(target=_download, args=(url, min(timeout, deadline), limit, cancelled, result),
                              name="mdetr-agf image download", daemon=True)
    worker.start()
    worker.join(deadline)
    if worker.is_alive():
        cancelled.set()
        raise DownloadError(f"could not fetch image {url}: not complete after {deadline:g} s; set "
                            f"$MDETR_AGF_IMAGE_DEADLINE to allow more (default {IMAGE_DEADLINE_S:g} s)")
    if "error" in result:
        raise result["error"]
    return io.BytesIO(result["body"])


def _download(url, timeout, limit, cancelled, result):
    import requests

    too_big = (f"could not fetch image {url}: it is larger than {limit} bytes; set $MDETR_AGF_IMAGE_MAX_BYTES "
               f"to allow more (default {IMAGE_MAX_BYTES})")
    try:
        with requests.get(url, timeout=timeout, stream=True) as response:
            response.raise_for_status()
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > limit:
                raise DownloadError(too_big)
            body = bytearray()
            for chunk in response.iter_content(64 * 1024):
                if cancelled.is_set():
                    return
                body += chunk
                if len(body) > limit:
                    raise DownloadError(too_big)
        result["body"] = bytes(body)
    except DownloadError as exc:
        result["error"] = exc
    except requests.RequestException as exc:
        error = DownloadError(f"could not fetch image {url} (timeout {timeout:g} s): {exc}")
        error.__cause__ = exc
        result["error"] = error


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
        except Image.DecompressionBombError as exc:
            raise InputError(f"{source!r} is too large to decode safely ({exc}); if you trust the file, raise "
                             f"PIL.Image.MAX_IMAGE_PIXELS (now {Image.MAX_IMAGE_PIXELS}) or pass it resized") from None
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
