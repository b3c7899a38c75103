"""Peak memory of a build whose probe folder holds one 12000 x 12000 image.

Four ``demo-cnn`` builds (layers conv4 and fc, crops and concept selection
on) over the same ``PROBE_IMAGES`` synthetic images, each in a fresh
``dnd-atlas build`` process whose own peak RSS (``VmHWM``) it reports as it exits:

- ``plain``: the folder as rendered;
- ``png``: plus one 12000 x 12000 RGB PNG of one colour (default
  ``record.max_image_pixels``: the header is over the limit, the file is
  skipped before a pixel is decoded);
- ``png_unlimited``: the same with ``record.max_image_pixels = 0`` (the PNG
  is decoded once, then reduced to 2,048 px);
- ``jpeg_unlimited``: a 12000 x 12000 JPEG instead, limit 0 (the JPEG
  decoder reads it at 1/4 scale).

Keys: ``hostile_peak_rss_mb_<build>`` and ``hostile_peak_rss_ratio_<build>``
(each against ``plain``, measured in the same run), ``hostile_entries`` (the
kinds of hostile entries ``testkit.hostile`` writes). ``DND_ATLAS_BENCH_DIR``
keeps the folders and atlases there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROBE_IMAGES = 300
SIDE = 12000
BUILDS = ("plain", "png", "png_unlimited", "jpeg_unlimited")


def _config(probe: Path, out: Path, unlimited: bool) -> str:
    import tomli_w

    cfg = {"out": str(out), "device": "cpu",
           "models": [{"name": "cnn", "target": "demo-cnn", "probe": str(probe), "layers": ["conv4", "fc"]}],
           "record": {"max_image_pixels": 0} if unlimited else {},
           "dissect": {"similarity_options": {"target": "demo-cnn"}}}
    path = out.with_suffix(".toml")
    path.write_text(tomli_w.dumps(cfg))
    return str(path)


# The build runs in a child whose own peak is read from /proc/self/status (VmHWM) as it exits:
# ``ru_maxrss`` of a child started by vfork (what subprocess uses) also counts the parent's peak.
_WRAP = """
import atexit, os, sys
def _hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            open(os.environ["DND_BENCH_HWM"], "w").write(line.split()[1])
atexit.register(_hwm)
from query.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _peak_rss_mb(config: str) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of one ``dnd-atlas build`` process."""
    hwm = Path(config).with_suffix(".hwm")
    env = {**os.environ, "DND_ATLAS_PROGRESS": "0", "HF_HUB_OFFLINE": "1", "DND_BENCH_HWM": str(hwm)}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _WRAP, "--log-level", "ERROR", "build", "--config", config],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"build {config} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-2000:]}")
    return int(hwm.read_text()) / 1024.0, time.perf_counter() - t  # VmHWM is in kB


def _folders(root: Path) -> dict[str, Path]:
    """The four probe folders: the rendered one and copies with the huge image."""
    from PIL import Image

    from builder.synthetic.probe import write_probe_set
    from testkit.hostile import write_png

    plain = Path(write_probe_set(root / "plain", n=PROBE_IMAGES, seed=0, progress=False))
    out = {"plain": plain}
    for name in ("png", "jpeg"):
        folder = root / name
        if not folder.exists():
            shutil.copytree(plain, folder)
        target = folder / "images" / f"huge.{'png' if name == 'png' else 'jpg'}"
        if not target.exists():
            if name == "png":
                write_png(target, SIDE, SIDE, (200, 30, 30))
            else:  # made in this process (432 MB for a moment), not in the measured builds
                Image.new("RGB", (SIDE, SIDE), (200, 30, 30)).save(target, quality=90)
        out[name] = folder
    return out


def run() -> dict[str, str]:
    from testkit.hostile import add_hostile_entries

    keep = os.environ.get("DND_ATLAS_BENCH_DIR")
    root = Path(keep) / "hostile" if keep else Path(tempfile.mkdtemp(prefix="dnd-hostile-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        folders = _folders(root)
        probe_of = {"plain": "plain", "png": "png", "png_unlimited": "png", "jpeg_unlimited": "jpeg"}
        peak: dict[str, float] = {}
        out: dict[str, str] = {}
        for b in BUILDS:
            atlas = root / f"atlas-{b}"
            shutil.rmtree(atlas, ignore_errors=True)
            peak[b], secs = _peak_rss_mb(_config(folders[probe_of[b]], atlas, b.endswith("unlimited")))
            out[f"hostile_peak_rss_mb_{b}"] = f"{peak[b]:.1f}"
            out[f"hostile_build_s_{b}"] = f"{secs:.1f}"
        for b in BUILDS[1:]:
            out[f"hostile_peak_rss_ratio_{b}"] = f"{peak[b] / peak['plain']:.3f}"
        kinds = root / "kinds"
        shutil.rmtree(kinds, ignore_errors=True)
        out["hostile_entries"] = str(len(add_hostile_entries(kinds)))
        return out
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
