"""The quota widget in headless Chromium (Debian's `chromium`): an app page on one loopback
origin includes /widget.js from a real `meterlane serve` on another, with an end-user key. A
user with quota sees used / remaining / reset per limit; a user who ran out also sees the
offer with its full disclosure and a button to the app's checkout; an expired key is a clear
message. A screenshot of each page is kept beside the test run's temporary files."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, update

from core.db import utcnow
from core.models import ApiKey
from tests.conftest import gateway_toml
from tests.e2e.test_serve import cli, start_server, stop
from tests.support.services import create_database
from tests.support.upstream import FakeUpstream
from tests.unit.paywall.test_offer_rules import GOOD

pytestmark = pytest.mark.e2e
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and not os.environ.get("MLANE_REQUIRE_BROWSER"):
    pytest.skip("no chromium on this machine (CI installs Debian's)", allow_module_level=True)

PLANS = """
[[plans]]
id = "free"
name = "Free"
default = true
[[plans.limits]]
metric = "tokens"
window = "day"
amount = 1000

[[plans]]
id = "pro"
price = { amount = 2000, currency = "eur", interval = "month" }
[[plans.limits]]
metric = "tokens"
window = "day"
amount = 200000
"""
PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>My AI app</title></head>
<body><h1>Your account</h1><div id="quota"></div>
<script src="{base}/widget.js" data-key="{key}" data-target="#quota"
        data-checkout-url="http://app.example/checkout" data-jurisdiction="{jurisdiction}"
        data-locale="{locale}"></script></body></html>"""


@dataclass
class Site:
    base: str   # meterlane serve
    app: str    # the app's own pages
    key: str
    root: Path
    engine: Any

    def api(self, method: str, path: str, **kw: Any) -> Any:
        resp = httpx.request(method, self.base + path, timeout=30,
                             headers={"Authorization": f"Bearer {self.key}"}, **kw)
        assert resp.status_code < 300, resp.text
        return resp.json()

    def page(self, name: str, user_key: str, jurisdiction: str = "", locale: str = "en") -> str:
        (self.root / f"{name}.html").write_text(PAGE.format(
            base=self.base, key=user_key, jurisdiction=jurisdiction, locale=locale))
        return f"{self.app}/{name}.html"


def serve_site(pg_server: str, upstream: FakeUpstream, tmp: Path, toml: str,
               name: str) -> Iterator[Site]:
    """A real `meterlane serve` with this config, and the app's own pages on another origin."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "m")
    url = create_database(pg_server, f"mlane_e2e_{name}_{worker}")
    (tmp / "meterlane.toml").write_text(gateway_toml(upstream.base_url) + toml)
    env = {**os.environ, "MLANE_DATABASE_URL": url, "MLANE_CONFIG": str(tmp / "meterlane.toml"),
           "MLANE_DATA_DIR": str(tmp / "var"), "MLANE_KEY_CACHE_SECONDS": "0"}
    assert cli(env, "db", "upgrade").returncode == 0
    created = cli(env, "keys", "create", "--role", "app", "--app", "widget-app")
    assert created.returncode == 0, created.stderr
    proc, base = start_server(env, tmp)
    pages = tmp / "pages"
    pages.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 partial(_QuietHandler, directory=str(pages)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    engine = create_engine(url)
    try:
        yield Site(base, f"http://127.0.0.1:{server.server_address[1]}",
                   created.stdout.strip().splitlines()[-1], pages, engine)
    finally:
        server.shutdown()
        stop(proc)
        engine.dispose()


@pytest.fixture(scope="module")
def site(pg_server: str, upstream: FakeUpstream,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    for site in serve_site(pg_server, upstream, tmp_path_factory.mktemp("widget"), PLANS,
                           "widget"):
        # A published offer, whose headline tries to inject markup into the page
        draft = {**GOOD, "copy": {**GOOD["copy"], "de": {
            **GOOD["copy"]["de"], "headline": '<img src=x onerror="document.title=1">Pro'}}}
        made = site.api("POST", "/v1/paywall/offers", json=draft)
        site.api("POST", f"/v1/paywall/offers/{GOOD['offer']}/versions/{made['version']}"
                 "/publish")
        yield site


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


def browse(site: Site, url: str, shot: str) -> str:
    """The page's DOM once its scripts have run, and a screenshot of it."""
    assert CHROMIUM is not None
    common = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",
              "--disable-dev-shm-usage", "--virtual-time-budget=15000",
              f"--user-data-dir={site.root / ('profile-' + shot)}"]
    subprocess.run([*common, f"--screenshot={site.root / (shot + '.png')}",
                    "--window-size=900,1400", url], capture_output=True, timeout=120,
                   check=False)
    done = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True,
                          timeout=120, check=False)
    return done.stdout


def texts(dom: str, cls: str) -> list[str]:
    found = re.findall(rf'class="{cls}"[^>]*>(.*?)</', dom, re.DOTALL)
    return [html.unescape(t) for t in found]


def user_key(site: Site, user: str) -> str:
    return str(site.api("POST", f"/v1/users/{user}/keys", json={"ttl_seconds": 3600})["key"])


def test_a_user_with_quota_sees_each_limit(site: Site) -> None:
    site.api("POST", "/v1/meter/track", json={
        "user": "ada", "model": "gpt-4o-mini", "idempotency_key": "w1",
        "usage": {"input_tokens": 200, "output_tokens": 50}})
    dom = browse(site, site.page("ada", user_key(site, "ada")), "with-quota")
    assert 'data-state="ok"' in dom, dom[-2000:]
    quota = site.api("GET", "/v1/users/ada/quota")["limits"][0]
    assert texts(dom, "ml-limit-name") == ["Tokens per day"]  # a readable name, not its id
    assert texts(dom, "ml-used") == [f"{quota['used']:,} used"] == ["250 used"]
    assert texts(dom, "ml-remaining") == [f"{quota['remaining']:,} left"]
    assert texts(dom, "ml-resets")[0].startswith("resets ")
    assert 'class="ml-offer"' not in dom  # quota left: no paywall
    assert (site.root / "with-quota.png").stat().st_size > 0


def test_a_user_who_ran_out_sees_the_offer_with_its_disclosure(site: Site) -> None:
    site.api("POST", "/v1/meter/track", json={
        "user": "bo", "model": "gpt-4o-mini", "idempotency_key": "w2",
        "usage": {"input_tokens": 1000, "output_tokens": 0}})
    dom = browse(site, site.page("bo", user_key(site, "bo"), "DE", "de"), "spent")
    assert 'data-state="spent"' in dom, dom[-2000:]
    assert texts(dom, "ml-remaining") == ["0 übrig"]  # the page is German: so is the widget
    assert texts(dom, "ml-limit-name") == ["Tokens pro Tag"]
    served = site.api("GET", "/v1/paywall/offers?jurisdiction=DE&locale=de")["data"][0]
    assert 'data-offer="pro-monthly"' in dom
    assert texts(dom, "ml-disclosure") == [served["disclosure"]]  # in full, as served
    assert "Zahlungspflichtig bestellen" in texts(dom, "ml-cta")
    href = html.unescape(re.search(r'class="ml-cta" href="([^"]+)"', dom)[1])  # type: ignore
    assert href.startswith("http://app.example/checkout?offer=pro-monthly&version=")
    assert f"content_hash={served['content_hash']}" in href
    assert "jurisdiction=EU-DE&locale=de&platform=web" in href  # what the consent names
    assert texts(dom, "ml-decline") == ["Nicht jetzt"]
    # the offer's copy is text on the page, never markup
    assert texts(dom, "ml-offer-headline") == ['<img src=x onerror="document.title=1">Pro']
    assert "<img" not in dom and "<title>My AI app</title>" in dom


def test_an_expired_widget_key_is_a_clear_message(site: Site) -> None:
    key = user_key(site, "cy")
    with site.engine.begin() as conn:  # the key's hour has passed
        conn.execute(update(ApiKey).where(ApiKey.key_id == key.split("_")[1]).values(
            expires_at=utcnow() - timedelta(minutes=1)))
    dom = browse(site, site.page("cy", key), "expired")
    assert 'data-status="401"' in dom, dom[-2000:]
    assert texts(dom, "ml-error") == [
        "Your quota session has expired: reload the page to see your quota."]
