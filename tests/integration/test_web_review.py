"""The web UI and the review gate, end to end: the real node (a subprocess) receives two series from DCMTK's
storescu; its destination (a DCMTK storescp standing in for the planning system) has ``review = true``, so
both results are held. A physicist logs in with a real browser (Debian's chromium, headless, through
Selenium), sees the preview and the structures on the series page, approves one result (its RTSTRUCT then
arrives at the storescp) and rejects the other with a reason (nothing arrives; the reason is shown). Then the
bad requests a hostile or clumsy client makes: wrong passwords (one sentence for both wrong parts, then
429), a forged form without the CSRF token, approving twice, approving a rejected job, an unknown job:
each gets its HTTP status and a sentence, and nothing is sent twice.

A screenshot of the series page is kept as ``series-page.png`` in the test's temporary folder (a CI
artefact; the README's screenshot is one of these).
"""

from __future__ import annotations

import html
import http.cookiejar
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from tests.harness.browser import chromium, requires_browser
from tests.harness.dcmtk import StoreSCP, free_port, storescu, tool_missing_reason
from tests.harness.node_process import REPO, NodeProcess
from tests.harness.synthetic_ct import write_ct_series

pytestmark = [pytest.mark.integration, requires_browser]

USER = "physicist"
PASSWORD = "correct horse battery"
LOGIN_ATTEMPTS = 3


class Client:
    """An HTTP client with its own cookie jar (a second browser session, without a browser)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                                  urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

    def request(self, path: str, form: dict[str, str] | None = None) -> tuple[int, str, Any]:
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        try:
            with self.opener.open(self.base + path, data=data, timeout=30) as resp:
                return resp.status, html.unescape(resp.read().decode()), resp.headers
        except urllib.error.HTTPError as err:
            return err.code, html.unescape(err.read().decode()), err.headers

    def csrf(self, path: str = "/review") -> str:
        status, body, _ = self.request(path)
        assert status == 200, body
        match = re.search(r'name="csrf" value="([^"]+)"', body)  # (a URL-safe token: unescaping leaves it)
        assert match, body
        return match.group(1)


def _sent_modalities(pacs: StoreSCP) -> list[str]:
    return sorted(str(dcmread(p, stop_before_pixels=True).Modality) for p in pacs.files())


def test_a_physicist_approves_one_result_and_rejects_another_in_a_real_browser(tmp_path: Path) -> None:
    if reason := tool_missing_reason("storescu", "storescp"):
        pytest.skip(reason)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    approved = write_ct_series(tmp_path / "a", slices=12, rows=128, columns=128, pixel_spacing=(3.2, 3.2), seed=1)
    rejected = write_ct_series(tmp_path / "b", slices=12, rows=128, columns=128, pixel_spacing=(3.2, 3.2), seed=2)
    http_port = free_port()
    base = f"http://127.0.0.1:{http_port}"
    with StoreSCP(tmp_path / "tps", ae_title="TPS") as tps:
        node = NodeProcess(tmp_path / "node", extra_toml=(
            f'[metrics]\nport = {http_port}\nbind_address = "127.0.0.1"\n'
            f"[web]\nlogin_attempts = {LOGIN_ATTEMPTS}\nrefresh_s = 1.0\n"
            f'[[destinations]]\nname = "tps"\nae_title = "TPS"\nhost = "127.0.0.1"\nport = {tps.port}\n'
            "review = true\n"))
        added = subprocess.run([sys.executable, "-m", "node", "web", "add-user", USER, "--password-stdin",
                                "-c", str(node.config_path), "--state-dir", str(node.state_dir)],
                               input=PASSWORD + "\n", cwd=REPO, capture_output=True, text=True, timeout=60)
        assert added.returncode == 0 and f"added {USER}" in added.stdout, added.stderr
        assert PASSWORD not in (node.state_dir / "web-users").read_text()
        with node:
            storescu("127.0.0.1", node.port, node.ae_title, approved.directory)
            storescu("127.0.0.1", node.port, node.ae_title, rejected.directory)
            status = node.wait_status(
                lambda s: sum(j["state"] == "awaiting_review" for j in s["jobs"]) == 2, timeout=120)
            job = {j["series_uid"]: j["id"] for j in status["jobs"]}
            job_a, job_b = job[approved.series_uid], job[rejected.series_uid]
            assert {o["state"] for o in status["outbox"]} == {"awaiting_review"}
            anonymous = Client(base)
            code, body, _ = anonymous.request("/readyz")
            assert code == 200 and json.loads(body)["review"]["awaiting"] == 2, body
            code, body, _ = anonymous.request("/metrics")
            assert "dicomseg_review_awaiting 2.0" in body
            assert anonymous.request(f"/series/{approved.series_uid}")[1].count('id="login"') == 1  # → log in
            time.sleep(2)
            assert tps.files() == [], "a held result reached the planning system before review"

            driver = chromium(tmp_path / "browser")
            try:
                wait = WebDriverWait(driver, 30)
                driver.get(f"{base}/series/{approved.series_uid}")
                assert "/login" in driver.current_url
                driver.find_element(By.ID, "username").send_keys(USER)
                driver.find_element(By.ID, "password").send_keys(PASSWORD)
                driver.find_element(By.ID, "login").click()
                wait.until(lambda d: d.find_elements(By.ID, f"approve-{job_a}"))
                assert driver.current_url.endswith(f"/series/{approved.series_uid}")
                image = driver.find_element(By.ID, f"preview-{job_a}")
                wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth",
                                                      image) > 0)
                structures = driver.find_element(By.ID, f"structures-{job_a}").text
                assert "BODY" in structures and "mL" in structures, structures
                assert driver.find_element(By.ID, "patient-name").text == "Synthetic^Phantom"  # behind the login
                assert driver.find_element(By.ID, f"job-state-{job_a}").text == "awaiting_review"
                driver.set_window_size(1280, 1400)  # the whole job card, buttons included, in the screenshot
                driver.save_screenshot(str(tmp_path / "series-page.png"))
                driver.set_window_size(1280, 800)
                driver.find_element(By.ID, f"note-{job_a}").send_keys("contours checked")
                driver.find_element(By.ID, f"approve-{job_a}").click()
                wait.until(lambda d: d.find_elements(By.ID, f"review-{job_a}"))
                decision = driver.find_element(By.ID, f"review-{job_a}").text
                assert decision.startswith(f"Approved by {USER}") and "contours checked" in decision, decision
                tps.wait_for_files(2, timeout=60)
                assert _sent_modalities(tps) == ["RTSTRUCT", "SEG"]
                # the page follows the delivery by itself (live refresh), without a reload
                wait.until(lambda d: d.find_element(By.ID, f"job-body-{job_a}").text.count("sent") == 2)

                driver.get(f"{base}/series/{rejected.series_uid}")
                wait.until(lambda d: d.find_elements(By.ID, f"reject-{job_b}"))
                driver.find_element(By.ID, f"reason-{job_b}").send_keys("BODY misses the left arm")
                driver.find_element(By.ID, f"reject-{job_b}").click()
                wait.until(lambda d: d.find_elements(By.ID, f"review-{job_b}"))
                decision = driver.find_element(By.ID, f"review-{job_b}").text
                assert decision.startswith(f"Rejected by {USER}") and "BODY misses the left arm" in decision
                assert driver.find_element(By.ID, f"job-state-{job_b}").text == "rejected"

                driver.get(f"{base}/")  # the series list, newest first, both there
                rows = driver.find_element(By.ID, "series-table").text
                assert rows.count("body-threshold") == 2 and "rejected" in rows and "done" in rows
                driver.set_window_size(390, 844)  # a phone
                driver.get(f"{base}/series/{approved.series_uid}")
                overflow = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
                wide = driver.execute_script(
                    "return Array.from(document.querySelectorAll('body *')).filter(e => "
                    "e.getBoundingClientRect().right > window.innerWidth + 1).slice(0, 8).map(e => e.tagName + '.' + "
                    "e.className + '#' + e.id + ' ' + Math.round(e.getBoundingClientRect().right))")
                assert overflow <= 1, f"the series page is {overflow} px wider than a phone's screen: {wide}"
            finally:
                driver.quit()

            time.sleep(3)
            assert _sent_modalities(tps) == ["RTSTRUCT", "SEG"], "the rejected result was sent"
            _bad_requests(base, job_a, job_b, approved.series_uid)
            assert _sent_modalities(tps) == ["RTSTRUCT", "SEG"], "something was sent twice"

            listed = subprocess.run([sys.executable, "-m", "node", "review", "list", "--json", "-c",
                                     str(node.config_path), "--state-dir", str(node.state_dir)],
                                    cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
            review = json.loads(listed.stdout)
            assert review["awaiting"]["awaiting"] == 0
            assert {(r["job_id"], r["decision"], r["reviewer"]) for r in review["decided"]} == {
                (job_a, "approved", USER), (job_b, "rejected", USER)}
            jobs = {j["id"]: j for j in node.status()["jobs"]}
            assert jobs[job_b]["state"] == "rejected" and jobs[job_b]["review"]["note"] == "BODY misses the left arm"
            assert jobs[job_a]["review"]["reviewer"] == USER
            assert "Synthetic" not in node.log_text()  # no patient name in the log


def _bad_requests(base: str, job_a: int, job_b: int, series_a: str) -> None:
    """Each bad request gets its status and a sentence; none changes what was decided or sent."""
    client = Client(base)
    code, body, _ = client.request("/login", {"username": USER, "password": "wrong password!"})
    assert code == 401 and "wrong user name or password" in body
    code, body2, _ = client.request("/login", {"username": "nobody", "password": PASSWORD})
    assert code == 401 and "wrong user name or password" in body2  # no hint which part was wrong
    code, body, _ = client.request(f"/jobs/{job_a}/approve", {"csrf": "x"})
    assert code == 401, body  # no action without a login
    code, body, _ = client.request("/login", {"username": USER, "password": PASSWORD})
    assert code == 200 and 'id="login"' not in body, body  # logged in (the failures were forgiven)
    code, body, _ = client.request(f"/jobs/{job_a}/approve", {"note": "forged"})
    assert code == 403 and "CSRF token is missing" in body
    token = client.csrf()
    code, body, _ = client.request(f"/jobs/{job_a}/approve", {"csrf": token})
    assert code == 409 and f"job {job_a} was already approved by {USER}" in body, body
    code, body, _ = client.request(f"/jobs/{job_b}/approve", {"csrf": token})
    assert code == 409 and f"job {job_b} was already rejected by {USER}" in body, body
    code, body, _ = client.request("/jobs/999999/approve", {"csrf": token})
    assert code == 404 and "job 999999 is not in the index" in body
    code, body, _ = client.request("/series/1.2.3.4.5")
    assert code == 404 and "series 1.2.3.4.5 is not in the index" in body
    code, body, _ = client.request("/outbox/retry", {"csrf": token})
    assert code == 200 and "0 dead letter(s) queued again" in body  # the button, after its redirect
    code, body, _ = client.request(f"/series/{series_a}/replay", {"csrf": token, "destination": "archive"})
    assert code == 400 and "destination(s) 'archive' unknown" in body
    # Failed logins are limited per address (and per name): past LOGIN_ATTEMPTS, even the right password waits.
    stranger = Client(base)
    for _ in range(LOGIN_ATTEMPTS):
        assert stranger.request("/login", {"username": USER, "password": "guess"})[0] == 401
    code, body, headers = stranger.request("/login", {"username": USER, "password": PASSWORD})
    assert code == 429 and "too many failed logins" in body and int(headers["Retry-After"]) > 0
