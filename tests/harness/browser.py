"""A real browser for the web UI's tests: Debian's chromium, headless, driven by Selenium through Debian's
chromedriver (never a downloaded browser: Selenium Manager is not asked)."""

from __future__ import annotations

from pathlib import Path

import pytest
from selenium.webdriver.chrome.webdriver import WebDriver

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def browser_missing_reason() -> str | None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        return f"{', '.join(missing)} missing: install Debian's chromium and chromium-driver (make tools)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install '.[test]')"
    return None


requires_browser = pytest.mark.skipif(browser_missing_reason() is not None, reason=browser_missing_reason() or "")


def chromium(download_dir: Path, width: int = 1280, height: int = 800) -> WebDriver:
    """A headless chromium WebDriver at ``width``×``height`` (the caller quits it)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    download_dir.mkdir(parents=True, exist_ok=True)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--no-first-run", "--disable-extensions",
                f"--user-data-dir={download_dir / 'profile'}"):
        options.add_argument(arg)
    log = download_dir / "chromedriver.log"
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(log))
    return webdriver.Chrome(options=options, service=service)
