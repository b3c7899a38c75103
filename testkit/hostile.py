"""Hostile probe folders: the entries a folder from the wild may hold.

``add_hostile_entries(folder)`` writes every kind into ``folder`` and returns
what a build must do with each (``HostileEntry.outcome``):

- ``"rejected"``: skipped by the scan (never opened) and counted;
- ``"skipped"``: listed, then skipped and counted when read;
- ``"read"``: a valid image, read (fitted to the model's input size);
- ``"folder"``: a folder with an image name, walked like any folder.

Large images are written row by row (``write_png``), so a 12000 x 12000 PNG
of one colour costs a few hundred KB on disk and no memory to make.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

OUTCOMES = ("rejected", "skipped", "read", "folder")


@dataclass(frozen=True)
class HostileEntry:
    """One entry of a hostile folder: its name (relative, as the scan lists
    it), what it is, and what a build must do with it."""

    name: str
    what: str
    outcome: str


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png(path: Path, width: int, height: int, color: tuple[int, ...] = (200, 30, 30),
              rows: int | None = None) -> Path:
    """A PNG of one colour, 8-bit RGB (``color`` of 3) or grayscale (of 1),
    streamed in blocks of rows (memory: 100 rows). ``rows`` < height writes
    only that many rows of data: a header declaring more than the file holds
    (a decompression-bomb header, or truncation)."""
    color_type = {3: 2, 1: 0}[len(color)]
    row = b"\x00" + bytes(color) * width  # filter type 0, then the pixels
    comp = zlib.compressobj(1)
    body = io.BytesIO()
    left = height if rows is None else rows
    while left > 0:
        k = min(left, 100)
        body.write(comp.compress(row * k))
        left -= k
    body.write(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body.getvalue()) + _chunk(b"IEND", b"")
    path.write_bytes(data)
    return path


def write_exif_rotated_jpeg(path: Path) -> Path:
    """A 40 x 20 JPEG, left half red and right half blue, tagged EXIF
    orientation 6 (viewers rotate it 90 degrees clockwise: 20 x 40, red on top)."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(path, format="JPEG", quality=95, exif=exif)
    return path


def write_gray16_png(path: Path) -> Path:
    """A 16-bit grayscale PNG (mode I;16): left half 0x8000 (mid gray), right half 0xFFFF."""
    arr = np.full((16, 16), 0xFFFF, np.uint16)
    arr[:, :8] = 0x8000
    Image.fromarray(arr).save(path, format="PNG")  # uint16 -> mode I;16
    return path


def write_palette_png(path: Path) -> Path:
    """A palette PNG whose index 0 is transparent (left half) and index 1 green."""
    im = Image.new("P", (16, 16), 1)
    im.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    im.paste(0, (0, 0, 8, 16))
    im.save(path, format="PNG", transparency=0)
    return path


def write_animated_gif(path: Path) -> Path:
    """A two-frame GIF: a red frame, then a blue one."""
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def add_hostile_entries(folder: Path, huge_side: int = 12000) -> list[HostileEntry]:
    """Write every hostile kind into ``folder`` (created if needed); returns
    each entry with the outcome a build must give it. The huge image is
    grayscale, so it is quick to write (``write_png`` makes RGB ones)."""
    folder.mkdir(parents=True, exist_ok=True)
    out: list[HostileEntry] = []

    def add(name: str, what: str, outcome: str) -> None:
        out.append(HostileEntry(name, what, outcome))

    os.mkfifo(folder / "x.png")
    add("x.png", "a FIFO named x.png", "rejected")
    os.symlink("nowhere.png", folder / "dangling.png")
    add("dangling.png", "a dangling symbolic link", "rejected")
    os.symlink("loop_b.png", folder / "loop_a.png")
    os.symlink("loop_a.png", folder / "loop_b.png")
    add("loop_a.png", "a symbolic link loop (a -> b)", "rejected")
    add("loop_b.png", "a symbolic link loop (b -> a)", "rejected")
    fd = os.open(os.fsencode(folder) + b"/bad\xffname.png", os.O_WRONLY | os.O_CREAT, 0o644)
    os.close(fd)
    add(os.fsdecode(b"bad\xffname.png"), "a file name that is not valid UTF-8", "rejected")
    (folder / "y.jpg").mkdir()
    add("y.jpg", "a folder named y.jpg", "folder")
    (folder / "empty.png").write_bytes(b"")
    add("empty.png", "a zero-byte file", "skipped")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 10)).save(buf, format="PNG")
    (folder / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    add("truncated.png", "a truncated PNG", "skipped")
    (folder / "z.png").write_text("this is a text file, not a PNG\n")
    add("z.png", "a text file named z.png", "skipped")
    write_png(folder / "huge.png", huge_side, huge_side, (90,))
    add("huge.png", f"a {huge_side} x {huge_side} PNG (over the default pixel limit)", "skipped")
    write_png(folder / "bomb.png", 100_000, 100_000, rows=2)
    add("bomb.png", "a header declaring 100000 x 100000 pixels (decompression bomb)", "skipped")
    Image.new("RGB", (1, 1), (255, 255, 0)).save(folder / "tiny.png")
    add("tiny.png", "a 1 x 1 image", "read")
    Image.new("CMYK", (24, 24), (0, 255, 255, 0)).save(folder / "cmyk.jpg", format="JPEG")
    add("cmyk.jpg", "a CMYK JPEG", "read")
    write_gray16_png(folder / "gray16.png")
    add("gray16.png", "a 16-bit grayscale PNG", "read")
    write_palette_png(folder / "palette.png")
    add("palette.png", "a palette PNG with transparency", "read")
    write_animated_gif(folder / "anim.gif")
    add("anim.gif", "an animated GIF", "read")
    write_exif_rotated_jpeg(folder / "rotated.jpg")
    add("rotated.jpg", "an EXIF-rotated JPEG", "read")
    return out
