"""``/ops/dashboard`` in headless Chromium against a live relay: the page fills itself from the admin API."""
from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Optional

import pytest
import requests

from config.phases import DOMAINS
from tests.ops.conftest import ADMIN, OpsRelay, start_ops_relay
from tests.support.redisproc import RedisServer

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1500,1000")


class DashboardDom(HTMLParser):
    """What the test reads of the dumped DOM: the cells of each domain's rows by class (``flags``: the
    phases table, ``rates``: the latency and rates table), the text of elements with an id, the charts."""

    def __init__(self) -> None:
        super().__init__()
        self.flags: dict[str, dict[str, str]] = {}
        self.rates: dict[str, dict[str, str]] = {}
        self.by_id: dict[str, str] = {}
        self.body: dict[str, Optional[str]] = {}
        self.charts = 0
        self._row: Optional[dict[str, str]] = None
        self._cell: Optional[str] = None
        self._id: Optional[str] = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, Optional[str]]]) -> None:
        attributes = dict(attrs)
        if tag == "body":
            self.body = attributes
        if tag == "tr" and attributes.get("data-domain"):
            self._row = self.flags.setdefault(attributes["data-domain"] or "", {})
        elif tag == "tr" and attributes.get("data-rates"):
            self._row = self.rates.setdefault(attributes["data-rates"] or "", {})
        elif tag == "td" and self._row is not None and attributes.get("class"):
            self._cell = (attributes["class"] or "").split(" ")[-1]
            self._row[self._cell] = ""
        elif tag == "svg" and self._row is not None:
            self.charts += 1
        if attributes.get("id"):
            self._id = attributes["id"]
            self.by_id[self._id or ""] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._row = None
        if tag == "td":
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._row is not None and self._cell:
            self._row[self._cell] += data.strip()
        if self._id is not None:
            self.by_id[self._id] += data.strip()
            self._id = None


def chromium() -> str:
    binary = shutil.which("chromium")
    assert binary is not None, "chromium is missing: `make chromium` installs Debian's chromium"
    return binary


def browse(url: str, profile: Path, *args: str, budget_ms: int = 5000) -> subprocess.CompletedProcess[str]:
    """Chromium on ``url`` for ``budget_ms`` of virtual time (the page refreshes every 2 s of it)."""
    return subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--virtual-time-budget={budget_ms}",
                           f"--user-data-dir={profile}", *args, url], capture_output=True, text=True, timeout=90)


@pytest.fixture(scope="module")
def ops(redis_session: RedisServer) -> Iterator[OpsRelay]:
    with start_ops_relay(redis_session, phase="shadow", STORE_AUDIT_PHASE="redis-read") as relay:
        relay.traffic(10)
        yield relay


def test_the_page_fills_phases_breaker_rates_and_flags_from_a_live_relay(ops: OpsRelay, tmp_path: Path) -> None:
    result = browse(ops.relay.url(f"/ops/dashboard?token={ADMIN}"), tmp_path / "profile", "--dump-dom")

    assert result.returncode == 0, result.stderr[-2000:]
    dom = DashboardDom()
    dom.feed(result.stdout)
    phases = ops.phases()
    assert dom.body.get("data-loaded") == "true", dom.by_id.get("status")
    assert dom.by_id["status"].startswith("updated")
    assert {domain: row["phase"] for domain, row in dom.flags.items()} == phases
    assert set(phases) == set(DOMAINS) and phases["audit"] == "redis-read"
    assert dom.flags["audit"]["backend"] == "redis" and dom.flags["machines"]["backend"] == "memory"
    assert dom.by_id["breaker"] == "closed"
    assert set(dom.rates) == set(DOMAINS)
    audit = dom.rates["audit"]
    assert float(audit["p50"]) <= float(audit["p95"]) <= float(audit["p99"])
    assert audit["errorRate"] == "0.00 %" and audit["fallbackRate"] == "0.00 %"
    assert audit["mismatchRate"].endswith(")")
    assert dom.charts == 4 * len(DOMAINS)
    assert "STORE_AUDIT_PHASE=redis-read" in result.stdout


def test_a_screenshot_of_the_page_is_saved(ops: OpsRelay, tmp_path: Path) -> None:
    shot = tmp_path / "dashboard.png"

    ops.traffic(5)

    result = browse(ops.relay.url(f"/ops/dashboard?token={ADMIN}"), tmp_path / "profile", f"--screenshot={shot}",
                    budget_ms=30_000)

    assert result.returncode == 0, result.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 20_000


def test_the_page_needs_the_token_in_the_header_or_the_query(ops: OpsRelay) -> None:
    page = ops.relay.url("/ops/dashboard")

    assert requests.get(page, timeout=10).status_code == 401
    assert requests.get(page, params={"token": "wrong"}, timeout=10).status_code == 401
    assert requests.get(page, headers={"x-admin-token": ADMIN}, timeout=10).status_code == 200
    assert requests.get(ops.relay.url("/ops/store"), params={"token": ADMIN}, timeout=10).status_code == 401


def test_the_page_loads_nothing_from_elsewhere_and_leaks_no_referrer(ops: OpsRelay) -> None:
    reply = requests.get(ops.relay.url("/ops/dashboard"), params={"token": ADMIN}, timeout=10)

    policy = reply.headers["Content-Security-Policy"]
    assert reply.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "'unsafe-inline'" not in policy
    assert reply.headers["Referrer-Policy"] == "no-referrer"
    assert reply.headers["Cache-Control"] == "no-store"
    page = reply.text.replace('"http://www.w3.org/2000/svg"', "")
    assert "http://" not in page and "https://" not in page and "//" + "cdn" not in page
