"""Headless Chromium (Debian's package) for tests that look at a page as a person would.

Run as root with no network but loopback: --no-sandbox, and every background service that would
try to reach the internet switched off; a fresh profile per call.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
         "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--mute-audio"]
_CONSOLE = re.compile(r"CONSOLE[:(]\d+|Uncaught", re.I)


def chromium_binary() -> str:
    """The Chromium to use, installing Debian's package where it is missing (skip, never fail)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    if shutil.which("apt-get") and _is_root():
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"], capture_output=True,
                       timeout=600)
        found = shutil.which("chromium")
        if found:
            return found
    pytest.skip("headless Chromium is not installed and cannot be (apt-get install chromium)")


def _is_root() -> bool:
    import os

    return os.geteuid() == 0


@dataclass
class PageLook:
    dom: str
    screenshot: Path
    console: list[str]  # console messages and uncaught errors the page produced


def look_at(url: str, shot: Path, width: int = 1200, height: int = 2400, timeout: float = 120) -> PageLook:
    """Load ``url`` headless: the DOM after load, a PNG screenshot and the page's console output."""
    binary = chromium_binary()
    with tempfile.TemporaryDirectory(prefix="trialsync-chromium-") as profile:
        base = [binary, *FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
                f"--window-size={width},{height}"]
        dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=timeout)
        pic = subprocess.run([*base, f"--screenshot={shot}", url], capture_output=True, text=True, timeout=timeout)
    console = [line for line in (dom.stderr + pic.stderr).splitlines() if _CONSOLE.search(line)]
    return PageLook(dom=dom.stdout, screenshot=shot, console=console)
