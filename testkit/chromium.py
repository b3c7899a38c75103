"""Headless Chromium for the browser tests: Debian's /usr/bin/chromium driven by Playwright.

Playwright's own browser download does not work offline, so the tests use
the system's Chromium (``make browser`` installs it) with a fresh profile
and no background traffic. :func:`require_chromium` skips the calling test
module where Chromium or Playwright is missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"  # screenshots and measured figures


def require_chromium() -> Any:
    """Playwright's sync API; skips the calling module when Chromium or Playwright is missing."""
    import pytest

    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium chromium-driver)",
                    allow_module_level=True)
    return pytest.importorskip("playwright.sync_api", reason="pip install playwright")


@contextmanager
def chromium_context(profile: Path) -> Iterator[Any]:
    """A persistent headless Chromium context with its profile in ``profile``, closed on exit."""
    from playwright import sync_api

    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        try:
            yield context
        finally:
            context.close()
