"""Opening pet images safely: whatever hides behind a `.jpg` name becomes an RGB image.

The Oxford-IIIT Pet download holds PNGs, GIFs, CMYK and greyscale JPEGs named `.jpg`, and a
few files that are empty or cut short. `check_image_file` finds the broken ones cheaply
(file type, header plus end marker, no pixel decoding) so they are left out before training
starts: a FIFO or a directory is never opened for reading, an image over the pixel limit is
named from its header size; `open_rgb` decodes the rest to RGB, at reduced size when the
caller needs far fewer pixels.
"""

from __future__ import annotations

import io
import os
import re
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# A file must end with its format's end marker within this many bytes (Oxford has JPEGs
# with a stray byte after the end-of-image marker, which decoders accept).
_TAIL_BYTES = 64
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND", "GIF": b";"}
# The file names a folder of images is searched for (sources.py, predict.py); any file named
# directly is opened whatever its name.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm"})
# Used when PIL's own limit is switched off (Image.MAX_IMAGE_PIXELS = None): its default.
DEFAULT_MAX_PIXELS = 89_478_485


def max_pixels() -> int:
    """The pixel limit an image must not exceed: PIL's `Image.MAX_IMAGE_PIXELS` (read at call
    time, so raising it raises ours), or its default when it is switched off."""
    return Image.MAX_IMAGE_PIXELS or DEFAULT_MAX_PIXELS


def check_image_file(path: str | Path) -> str | None:
    """Why `path` can't be used as an image, or None when it can.

    Only a regular file is opened (a FIFO named .jpg would block the scan forever), and it
    is opened non-blocking and checked again through its handle, so a file swapped in
    between cannot block either. Reads the header and the last bytes through one file
    handle: ~50 us a file, no pixel decoding.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return "not a regular file"
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        with open(fd, "rb") as f:
            status = os.fstat(f.fileno())
            if not stat.S_ISREG(status.st_mode):
                return "not a regular file"
            return _check_open_image(f, status.st_size)
    except FileNotFoundError:
        return "missing file"
    except OSError as e:
        return f"unreadable ({e.strerror})"
    except ValueError as e:  # a NUL byte in the path
        return f"unusable path ({e})"


def check_image_bytes(data: bytes) -> str | None:
    """Why an image held in memory (a `datasets` image cell) can't be used, or None: the
    checks of `check_image_file`."""
    return _check_open_image(io.BytesIO(data), len(data))


def _check_open_image(f, size: int) -> str | None:
    if size == 0:
        return "empty file"
    limit = max_pixels()
    try:
        # PIL warns between its limit and twice it and raises above; the size in the
        # header is all that is needed here, and the verdict is ours (below)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(f) as img:  # a file object passed in stays open
                image_format = img.format
                width, height = img.size
    except Image.DecompressionBombError as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        pixels = f"{int(found.group(1)):,} pixels" if found else str(e)
        return f"over the pixel limit ({pixels} > {limit:,})"
    except UnidentifiedImageError:
        return "not an image PIL can read"
    except (OSError, ValueError, SyntaxError) as e:
        return f"unreadable header ({e})"
    if width < 1 or height < 1:
        return "image has no pixels"
    if width * height > limit:
        return f"over the pixel limit ({width}x{height} = {width * height:,} pixels > {limit:,})"
    marker = _END_MARKERS.get(image_format)
    if marker is not None:
        f.seek(max(0, size - _TAIL_BYTES))
        tail = f.read()
        # A GIF must end with its ';' trailer (the byte also occurs inside compressed data);
        # JPEG and PNG markers are distinctive enough to be searched for in the tail.
        ends = (tail.rstrip(b"\x00\r\n\t ").endswith(marker) if image_format == "GIF"
                else marker in tail)
        if not ends:
            return f"truncated {image_format} (no end marker)"
    return None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode (P, RGBA, LA, L, 1, CMYK, I;16, I, F) to 8-bit RGB."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit and float images: scale the actual range to 0..255 instead of clipping.
        values = np.asarray(img, dtype=np.float32)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(values.max()), 1.0)
        values = np.clip(values / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(values, mode="L").convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (
        img.mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        # Composite on white: transparent pixels would otherwise become arbitrary colours.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    return img.convert("RGB")


def open_rgb(source, min_side: int | None = None) -> Image.Image:
    """Decode a `datasets.Image(decode=False)` record, a path or a PIL image to RGB.

    With `min_side`, JPEGs decode at 1/2, 1/4 or 1/8 scale (PIL draft mode) while both
    sides stay >= min_side: a 500x375 photo needed at 64 px decodes 8x fewer pixels.
    """
    if isinstance(source, Image.Image):
        img = source
    else:
        if isinstance(source, dict):
            source = io.BytesIO(source["bytes"]) if source.get("bytes") else source["path"]
        img = Image.open(source)
    if min_side and img.format == "JPEG":
        img.draft("RGB", (min_side, min_side))
    img.load()
    return to_rgb(img)
