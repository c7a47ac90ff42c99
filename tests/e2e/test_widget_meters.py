"""The quota widget's line for a custom meter's limit, in headless Chromium (Debian's
`chromium`): a user who recorded web searches sees how many of the day's searches they used,
of how many, and have left, in the meter's unit. A screenshot is kept beside the test run's
temporary files."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.test_widget import Site, browse, serve_site, texts, user_key
from tests.integration.test_meters import METERS
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def site(pg_server: str, upstream: FakeUpstream,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    yield from serve_site(pg_server, upstream, tmp_path_factory.mktemp("widget-meters"),
                          METERS, "widget_meters")  # 10 web searches a day


def test_a_meter_limit_shows_its_use_limit_and_unit(site: Site) -> None:
    for n in range(3):
        site.api("POST", "/v1/meter/events", json={
            "user": "mo", "meter": "web_search_calls", "idempotency_key": f"s{n}"})
    dom = browse(site, site.page("mo", user_key(site, "mo")), "meters")
    assert 'data-state="ok"' in dom, dom[-2000:]
    [line] = site.api("GET", "/v1/users/mo/quota")["limits"]
    assert (line["used"], line["limit"], line["unit"]) == (3, 10, "searches")
    assert 'data-limit="meter-web_search_calls-day"' in dom
    assert texts(dom, "ml-limit-name") == ["Web searches a day"]
    assert texts(dom, "ml-used") == ["3 of 10 searches used"]
    assert texts(dom, "ml-remaining") == ["7 searches left"]
    assert texts(dom, "ml-resets")[0].startswith("resets ")
    assert 'style="width: 30%;"' in dom  # the bar: 3 of 10
    assert (site.root / "meters.png").stat().st_size > 0
    german = browse(site, site.page("mo-de", user_key(site, "mo"), locale="de"), "meters-de")
    assert texts(german, "ml-used") == ["3 von 10 searches verbraucht"]  # the unit as set
    assert texts(german, "ml-remaining") == ["7 searches übrig"]
