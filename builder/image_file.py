"""Reading one image file of a probe set, whatever the folder holds.

- Only regular files are read: the file is opened non-blocking and checked
  with ``fstat`` before a byte is read, so a FIFO, a socket or a device that
  carries an image name never blocks a build.
- The pixel count declared in the header is checked before decoding
  (``max_pixels``, ``record.max_image_pixels``; Pillow's own limit is set
  aside so this one decides), so a decompression bomb costs a header read.
- Images whose longer side exceeds ``max_side`` are decoded reduced: JPEGs
  at 1/2, 1/4 or 1/8 scale by the decoder itself (``draft``), other formats
  decoded once and reduced at once, so what the pipeline holds stays small.
- The result is RGB and upright: EXIF orientation applied, 16-bit and float
  images scaled to 8 bits, alpha dropped (as torchvision's and Hugging
  Face's loaders do), the first frame of an animation.

Every failure is a :class:`ProbeFileError` with a one-line reason.
"""

from __future__ import annotations

import os
import stat
import threading
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from builder.errors import BuildError

DEFAULT_MAX_PIXELS = 89_478_485  # record.max_image_pixels: Pillow's own default limit (~9,459 x 9,459)
MAX_DECODE_SIDE = 2048  # longer side above which images are decoded reduced

_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {  # EXIF orientation -> the transposition that makes the image upright
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_PIL_LIMIT_LOCK = threading.Lock()


class ProbeFileError(BuildError):
    """A probe file that cannot be read as an image (it is skipped, or fails
    the neurons that needed it)."""


class ProbeFileChanged(ProbeFileError):
    """A probe file that vanished or changed after the probe set was scanned."""


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words ("a FIFO", "a socket", ...)."""
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | Path, expect: tuple[int, int] | None = None) -> BinaryIO:
    """``path`` opened for reading, refused unless it is a regular file (a
    FIFO is opened non-blocking and refused, never waited on) and, when
    ``expect`` = (size, mtime_ns) is given, unless it is unchanged since then."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        cls = ProbeFileChanged if expect else ProbeFileError
        raise cls(f"{path}: vanished" if expect else f"{path}: does not exist") from None
    except OSError as exc:
        raise ProbeFileError(f"{path}: cannot be opened ({exc.strerror or exc.__class__.__name__})") from None
    f = os.fdopen(fd, "rb")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        f.close()
        raise ProbeFileError(f"{path}: {file_kind(st.st_mode)}, not an image file")
    if expect is not None and (st.st_size, st.st_mtime_ns) != tuple(expect):
        f.close()
        raise ProbeFileChanged(f"{path}: changed since the probe set was scanned")
    return f


def fit_within(size: tuple[int, int], side: int) -> tuple[int, int]:
    """``size`` scaled down so its longer side is ``side`` (unchanged when it fits)."""
    w, h = size
    if max(w, h) <= side:
        return w, h
    s = side / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def _pil_open(f: BinaryIO, path: str | Path, max_pixels: int) -> Image.Image:
    """Pillow's lazy open (header only), with this module's pixel limit in
    place of Pillow's: its warning is silenced, and its hard error (above
    twice its limit) is lifted when ``max_pixels`` allows more."""
    pil_hard = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(f)
        except Image.DecompressionBombError:
            if pil_hard and 0 < max_pixels <= pil_hard:
                raise ProbeFileError(f"{path}: declares more than {pil_hard:,} pixels, over "
                                     f"record.max_image_pixels ({max_pixels:,})") from None
        with _PIL_LIMIT_LOCK:
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                return Image.open(f)
            finally:
                Image.MAX_IMAGE_PIXELS = saved


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
        return int(value) if int(value) in _TRANSPOSE else 1
    except Exception:  # noqa: BLE001 - malformed EXIF: the image as stored
        return 1


def upright_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """The displayed size of an image stored as ``size`` with EXIF ``orientation``."""
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


def to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as 8-bit RGB: 16-bit and 32-bit integer images scaled from
    16 bits, float images from [0, 1] (or clipped to [0, 255] when larger),
    transparency dropped; an RGB image is returned as is."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I") or mode == "F":
        a = np.asarray(im, dtype=np.float32)
        if mode == "F":
            a = a * 255.0 if np.nanmax(a, initial=0.0) <= 1.0 else a
        else:
            a = a / 257.0
        gray = np.nan_to_num(a).clip(0, 255).round().astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode in ("P", "PA") and (mode == "PA" or "transparency" in im.info):
        return im.convert("RGBA").convert("RGB")
    return im.convert("RGB")


def image_header(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int = MAX_DECODE_SIDE,
                 expect: tuple[int, int] | None = None) -> tuple[int, int]:
    """The (width, height) ``open_image`` would return, from the header alone."""
    with open_regular(path, expect) as f:
        try:
            im = _pil_open(f, path, max_pixels)
        except ProbeFileError:
            raise
        except Exception as exc:  # noqa: BLE001 - anything Pillow raises on a file that is not an image
            raise ProbeFileError(f"{path}: not a readable image ({exc.__class__.__name__})") from None
        _check_pixels(path, im.size, max_pixels)
        return upright_size(fit_within(im.size, max_side), _orientation(im))


def _check_pixels(path: str | Path, size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ProbeFileError(f"{path}: declares an empty image ({w} x {h})")
    if max_pixels > 0 and w * h > max_pixels:
        raise ProbeFileError(f"{path}: declares {w:,} x {h:,} = {w * h:,} pixels, over "
                             f"record.max_image_pixels ({max_pixels:,})")


def open_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int = MAX_DECODE_SIDE,
               expect: tuple[int, int] | None = None) -> Image.Image:
    """Image file ``path`` decoded as upright 8-bit RGB, reduced to fit
    ``max_side`` when larger; raises ProbeFileError (one line) when it is not
    a regular file, declares more than ``max_pixels`` pixels (0: no limit), is
    not a readable image, or (``expect`` given) changed since it was scanned."""
    with open_regular(path, expect) as f:
        try:
            im = _pil_open(f, path, max_pixels)
            _check_pixels(path, im.size, max_pixels)
            return _decode(im, max_side)
        except ProbeFileError:
            raise
        except Exception as exc:  # noqa: BLE001 - truncated data, bad chunks, unknown modes, out of memory
            raise ProbeFileError(f"{path}: not a readable image ({exc.__class__.__name__})") from None


def _decode(im: Image.Image, max_side: int) -> Image.Image:
    """Decode an opened image reduced to ``max_side``, as upright RGB."""
    orientation = _orientation(im)
    final = fit_within(im.size, max_side)
    if final != im.size:
        im.draft(None, final)  # JPEG: the decoder scales by 1/2, 1/4 or 1/8 (no-op for other formats)
    im.load()
    out = to_rgb(im)
    if out.size != final:
        out = out.resize(final, Image.BICUBIC, reducing_gap=2.0)
    elif out is im:
        out = im.copy()  # a plain image, detached from the file
    if orientation != 1:
        out = out.transpose(_TRANSPOSE[orientation])
    return out
