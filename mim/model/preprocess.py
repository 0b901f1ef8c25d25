"""Image and text input handling shared by training, the Triton preprocessing models and the client.

Everything here is plain NumPy/Pillow so the python-backend models can call it unchanged, and it is unit-tested
without Triton. Errors are `InputError` (a ValueError) whose message says what was got and what was expected.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image, ImageOps

from mim.errors import ModelError
from mim.model.config import PreprocessConfig


class InputError(ModelError):
    """A request input that cannot be used; the message is safe to return to the caller."""


def _describe(data: bytes) -> str:
    head = data[:8].hex(" ") if data else ""
    return f"{len(data)} bytes starting with [{head}]"


# JPEG draft decoding: libjpeg can decode at 1/2, 1/4 or 1/8 scale straight from the DCT coefficients, which
# skips most of the work for a multi-megapixel photo that ends up at image_size pixels. The scale chosen keeps
# the shorter side at least JPEG_DRAFT_MARGIN x image_size, so the bicubic resize after it still does the final,
# antialiased reduction. Gated on embeddings (cosine >= 0.999 against full decoding, benchmarks/preprocess.py).
JPEG_DRAFT_MARGIN = 2


def decode_image(data: bytes, cfg: PreprocessConfig, draft: bool = False) -> Image.Image:
    """Encoded bytes -> RGB PIL image, EXIF orientation applied.

    Grayscale, palette, CMYK and alpha images are converted to RGB (alpha composited on white, the catalog's
    background). The pixel limit is checked from the header before any pixel is decoded. With `draft`, a large
    JPEG is decoded at a reduced scale that keeps its shorter side >= JPEG_DRAFT_MARGIN x cfg.image_size.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InputError(f"image must be encoded bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise InputError("image is empty (0 bytes); expected an encoded JPEG, PNG or WebP file")
    if len(data) > cfg.max_image_bytes:
        raise InputError(
            f"image is {len(data)} bytes, over the limit of {cfg.max_image_bytes}; resize or recompress it"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > cfg.max_image_pixels:
                raise InputError(
                    f"image is {w}x{h} = {w * h} pixels, over the limit of {cfg.max_image_pixels}; "
                    "downscale it before sending"
                )
            if draft and img.format == "JPEG":
                img.draft(None, _draft_size(w, h, JPEG_DRAFT_MARGIN * cfg.image_size))
            img.load()
    except InputError:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own guard, in case it triggers first
        raise InputError(f"image refused as a decompression bomb: {e}") from None
    except Exception as e:  # Pillow raises many types for corrupt data
        raise InputError(
            f"could not decode image ({_describe(data)}): {type(e).__name__}: {e}; expected a JPEG, PNG or WebP file"
        ) from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:
        pass  # a broken EXIF block should not lose an otherwise good image
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    return img.convert("RGB")


def _draft_size(w: int, h: int, shorter: int) -> tuple[int, int]:
    """The size to ask `Image.draft` for: the image scaled so its shorter side is `shorter` (draft then picks
    the largest DCT reduction whose result is at least that large)."""
    k = shorter / min(w, h)
    return max(1, math.ceil(w * k)), max(1, math.ceil(h * k))


# How the longer side is sized when the shorter one becomes S: ours rounds; CLIP (torchvision's Resize, as
# transformers' CLIPImageProcessor) truncates, and an imported CLIP model keeps that to see its own pixels.
_LONG_SIDE = {"shorter_side_center_crop": round, "clip": int}


def image_to_array(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """RGB image -> normalised float32 (3, S, S): shorter side resized to S (bicubic), centre crop."""
    if cfg.resize_mode not in _LONG_SIDE:
        raise ValueError(f"unknown resize_mode {cfg.resize_mode!r}; expected one of {sorted(_LONG_SIDE)}")
    long_side = _LONG_SIDE[cfg.resize_mode]
    s = cfg.image_size
    w, h = img.size
    scale = s / min(w, h)
    nw, nh = max(s, long_side(w * scale)), max(s, long_side(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - s) // 2, (nh - s) // 2
    img = img.crop((left, top, left + s, top + s))
    x = np.asarray(img, dtype=np.float32) / 255.0  # (S, S, 3)
    x = (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # (3, S, S)


def preprocess_image_bytes(data: bytes, cfg: PreprocessConfig, draft: bool = True) -> np.ndarray:
    """Encoded bytes -> normalised (3, S, S) float32; large JPEGs decode in draft mode unless `draft=False`."""
    return image_to_array(decode_image(data, cfg, draft=draft), cfg)


def decode_text(data: bytes | str, cfg: PreprocessConfig) -> str:
    """Request bytes -> text. Empty or whitespace-only text and non-UTF-8 bytes are errors; long text is not
    (the tokenizer truncates it) unless it exceeds `max_text_bytes`."""
    if isinstance(data, str):
        raw = data.encode("utf-8", errors="surrogatepass")
        text = data
    elif isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(
                f"text is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); send UTF-8 encoded text"
            ) from None
    else:
        raise InputError(f"text must be str or UTF-8 bytes, got {type(data).__name__}")
    if len(raw) > cfg.max_text_bytes:
        raise InputError(
            f"text is {len(raw)} bytes, over the limit of {cfg.max_text_bytes}; send a short query or title "
            f"(only the first {cfg.context_length} tokens are used anyway)"
        )
    if not text.strip():
        raise InputError("text is empty; expected a non-empty query or title")
    return text
