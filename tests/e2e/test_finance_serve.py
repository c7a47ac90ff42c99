"""Finance as a new user tries it: `meterlane demo seed` fills a database, `meterlane report`
prints the summary and margins (compared with the API and with sums read straight from the
ledger), and the /finance dashboard of a real `meterlane serve` is opened in headless Chromium
(Debian's `chromium`): it renders, its figures are the API's, and a screenshot is kept."""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import create_engine, func, select

from metering.models import UsageEvent
from tests.e2e.test_serve import cli, start_server, stop
from tests.integration.test_finance import finance_toml
from tests.support.services import create_database
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.e2e
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class Books:
    base: str
    key: str
    env: dict[str, str]
    root: Path
    period: str
    url: str

    def api(self, path: str) -> Any:
        resp = httpx.get(self.base + path, headers={"Authorization": f"Bearer {self.key}"},
                         timeout=60)
        assert resp.status_code == 200, resp.text
        return resp.json()


@pytest.fixture(scope="module")
def books(pg_server: str, upstream: FakeUpstream,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Books]:
    tmp = tmp_path_factory.mktemp("finance")
    worker = os.environ.get("PYTEST_XDIST_WORKER", "m")
    url = create_database(pg_server, f"mlane_e2e_finance_{worker}")
    (tmp / "meterlane.toml").write_text(finance_toml(upstream.base_url))
    env = {**os.environ, "MLANE_DATABASE_URL": url, "MLANE_CONFIG": str(tmp / "meterlane.toml"),
           "MLANE_DATA_DIR": str(tmp / "var"), "MLANE_KEY_CACHE_SECONDS": "0"}
    assert cli(env, "db", "upgrade").returncode == 0
    created = cli(env, "keys", "create", "--role", "finance", "--app", "demo")
    assert created.returncode == 0, created.stderr
    seeded = cli(env, "demo", "seed", "--users", "60", "--days", "20", "--app", "demo")
    assert seeded.returncode == 0, seeded.stderr
    period = re.search(r"--period (\d{4}-\d{2})", seeded.stdout)
    assert period is not None, seeded.stdout
    proc, base = start_server(env, tmp)
    try:
        yield Books(base, created.stdout.strip().splitlines()[-1], env, tmp, period[1], url)
    finally:
        stop(proc)


def test_the_cli_reports_what_the_api_and_the_ledger_say(books: Books) -> None:
    b = books
    printed = cli(b.env, "report", "summary", "--app", "demo", "--period", b.period,
                  "--format", "json")
    assert printed.returncode == 0, printed.stderr
    summary = orjson.loads(printed.stdout)
    api = b.api(f"/v1/finance/summary?period={b.period}")
    assert {k: v for k, v in summary.items() if k != "rolled_up_at"} == {
        k: v for k, v in api.items() if k != "rolled_up_at"}
    engine = create_engine(b.url)
    try:
        y, m = map(int, b.period.split("-"))
        from datetime import UTC, datetime

        start = datetime(y, m, 1, tzinfo=UTC)
        end = datetime(y + m // 12, m % 12 + 1, 1, tzinfo=UTC)
        with engine.connect() as conn:
            calls, cloud = conn.execute(select(
                func.count(), func.coalesce(func.sum(UsageEvent.cost_pico_usd), 0)).where(
                UsageEvent.created_at >= start, UsageEvent.created_at < end)).one()
    finally:
        engine.dispose()
    assert summary["calls"] == calls
    assert Decimal(summary["cloud_cost_usd"]) == Decimal(cloud) / 10**12
    margins = cli(b.env, "report", "margins", "--app", "demo", "--period", b.period,
                  "--group-by", "plan", "--format", "csv")
    assert margins.returncode == 0, margins.stderr
    rows = list(csv.DictReader(io.StringIO(margins.stdout)))
    assert rows[-1]["key"] == "TOTAL"
    # money to the cent in CSV (JSON keeps it exact): each figure is the exact one rounded
    exact = Decimal(summary["inference_cost_usd"])
    assert Decimal(rows[-1]["cost_usd"]) == exact.quantize(Decimal("0.01"), ROUND_HALF_UP)
    assert all(re.fullmatch(r"-?\d+\.\d\d", r[c]) for r in rows
               for c in ("revenue_usd", "cost_usd", "margin_usd") if r[c])
    assert abs(sum(Decimal(r["cost_usd"]) for r in rows[:-1]) - exact) \
        <= Decimal("0.005") * (len(rows) - 1)
    text = cli(b.env, "report", "summary", "--app", "demo", "--period", b.period)
    line = next(ln for ln in text.stdout.splitlines() if ln.startswith("inference_cost_usd"))
    assert len(line) == 57 and line.endswith(f"{exact.quantize(Decimal('0.01'), ROUND_HALF_UP):,}")
    bad = cli(b.env, "report", "summary", "--app", "demo", "--period", "last-month")
    assert bad.returncode != 0 and "period must be" in bad.stderr


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("MLANE_REQUIRE_BROWSER"),
                    reason="no chromium on this machine (CI installs Debian's)")
def test_the_dashboard_shows_the_apis_figures(books: Books) -> None:
    assert CHROMIUM is not None, "MLANE_REQUIRE_BROWSER is set but chromium is missing"
    b = books
    page = f"{b.base}/finance#key={b.key}&period={b.period}"
    common = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",
              "--disable-dev-shm-usage", "--virtual-time-budget=15000",
              f"--user-data-dir={b.root / 'chromium-profile'}"]
    shot = b.root / "finance-dashboard.png"
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1300,1100", page],
                   capture_output=True, timeout=120, check=False)
    dom = subprocess.run([*common, "--dump-dom", page], capture_output=True, text=True,
                         timeout=120, check=False).stdout
    assert 'data-loaded="yes"' in dom, dom[-2000:]
    # the charts scale with their cards (viewBox units, no fixed pixel width: on main they
    # overflowed at 1400 and 1920 px) and every bar carries its value
    svgs = re.findall(r"<svg[^>]*>", dom)
    assert len(svgs) == 4 and all("viewBox" in t and " width=" not in t for t in svgs), svgs
    assert dom.count("<rect") == len(re.findall(r'<text[^>]* class="value" data-exact', dom))
    assert shot.exists() and shot.stat().st_size > 10_000  # a screenshot of a drawn page
    summary = b.api(f"/v1/finance/summary?period={b.period}")
    shown = dict(re.findall(r'data-field="([a-z_]+)" data-exact="([^"]*)"', dom))
    for field in ("revenue_usd", "inference_cost_usd", "gross_margin_usd",
                  "active_users_monthly", "cost_per_active_user_usd"):
        assert shown[field] == str(summary[field]), field
    plans = b.api(f"/v1/finance/margins?period={b.period}&group_by=plan")["rows"]
    bars = dict(re.findall(r'data-key="([^"]+)" class="value" data-exact="([^"]*)"', dom))
    for row in plans:
        assert bars[row["key"]] == row["margin_usd"]
    days = b.api(f"/v1/finance/margins?period={b.period}&group_by=day")["rows"]
    points = re.findall(r'data-day="([0-9-]+)" data-value="([0-9.]+)"', dom)
    assert len(points) == len([d for d in days if d["active_users"] > 0]) > 0
    # a page opened without a key says what to do
    fresh = [*common[:-1], f"--user-data-dir={b.root / 'chromium-fresh'}"]
    bare = subprocess.run([*fresh, "--dump-dom", f"{b.base}/finance"], capture_output=True,
                          text=True, timeout=120, check=False).stdout
    assert "a finance key" in bare
