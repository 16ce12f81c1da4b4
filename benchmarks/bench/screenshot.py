"""A headless-Chromium screenshot of the HTML report: proof that the page renders its plot offline."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

# as the machine notes advise: no sandbox as root, no GPU, and no background networking on a closed network
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def screenshot(html: Path, png: Path, chromium: str = "chromium", size: tuple[int, int] = (1200, 1400),
               wait_ms: int = 3000) -> Path:
    """Render ``html`` in headless Chromium and save a ``size`` screenshot to ``png``."""
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        cmd = [chromium, *FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
               f"--virtual-time-budget={wait_ms}", f"--screenshot={png.resolve()}", html.resolve().as_uri()]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    if not png.is_file():
        raise RuntimeError(f"Chromium wrote no screenshot of {html}")
    return png
