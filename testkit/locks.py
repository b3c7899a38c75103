"""Other processes holding an atlas file, for the tests of readers and writers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_HOLD = """
import duckdb, sys, time
con = duckdb.connect(sys.argv[1], read_only=sys.argv[3] == "ro")
print("held", flush=True)
time.sleep(float(sys.argv[2]))
con.close()
"""

_CAN_READ = """
import duckdb, sys
try:
    duckdb.connect(sys.argv[1], read_only=True).close()
    print("yes")
except duckdb.Error:
    print("no")
"""


def hold(db: Path, seconds: float, mode: str = "rw") -> subprocess.Popen:
    """Another process holding ``db`` read-write (``mode="rw"``) or read-only
    (``"ro"``) for ``seconds``; returns once it holds it (fails if it cannot)."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(db), str(seconds), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()  # type: ignore[union-attr]
    if line != "held":
        proc.wait(timeout=60)
        raise AssertionError(f"could not hold {db}: {proc.stderr.read()[-500:]}")  # type: ignore[union-attr]
    return proc


def readable_elsewhere(db: Path) -> bool:
    """Whether another process can open ``db`` read-only right now."""
    out = subprocess.run([sys.executable, "-c", _CAN_READ, str(db)], capture_output=True, text=True,
                         check=True, timeout=120)
    return out.stdout.strip() == "yes"
