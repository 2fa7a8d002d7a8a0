"""Headless Debian Chromium driven by Selenium through Debian's chromedriver, offline.

The flags keep a browser on a closed network quiet (no update checks, sync, QUIC or background
fetches, which would otherwise flood failed connections), and each browser gets a fresh profile.
Selenium is given both binaries, so it never looks for (or downloads) a driver of its own.
"""

from __future__ import annotations

import os
import pathlib

CHROMIUM = pathlib.Path("/usr/bin/chromium")
CHROMEDRIVER = pathlib.Path("/usr/bin/chromedriver")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


def missing() -> str | None:
    """Why the browser cannot run here, or None when it can."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return (
                f"{path} is missing: `make test` installs Debian's chromium and chromium-driver "
                "when run as root (or: apt-get install chromium chromium-driver)"
            )
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -c constraints.txt -e '.[dev]')"
    return None


def start(profile_dir, *, width: int = 1400, height: int = 900):
    """A headless Chromium WebDriver with a fresh profile in `profile_dir`."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile_dir}")
    options.add_argument(f"--window-size={width},{height}")
    return webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
