"""A new user's first minutes: `meterlane init` writes a configuration that loads as it is,
with an offer that publishes and a price sheet that imports against it; `--version`; and the
service's front page, for a browser and for an API client."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner
from sqlalchemy.engine import Engine

from tests.conftest import bearer, config_from_toml

pytestmark = pytest.mark.integration


def test_init_writes_a_config_whose_offer_publishes_and_prices_import(
        tmp_path: Path, clean_db: Engine, pg_url: str) -> None:
    from app import create_app, main
    from core.auth import Role

    runner = CliRunner()
    done = runner.invoke(main, ["init", "--dir", str(tmp_path / "mine")])
    assert done.exit_code == 0, done.output
    written = sorted(p.name for p in (tmp_path / "mine").iterdir())
    assert written == ["meterlane.toml", "offer.json", "prices.csv"]
    again = runner.invoke(main, ["init", "--dir", str(tmp_path / "mine")])
    assert again.exit_code == 1 and "--force replaces them" in again.output

    toml = (tmp_path / "mine" / "meterlane.toml").read_text()
    app = create_app(config_from_toml(toml, tmp_path, database_url=pg_url))
    w = app.extensions["wiring"]
    try:
        key = w.keys.create_key(Role.APP, "acme").key
        admin = w.keys.create_key(Role.ADMIN, None).key  # operator-wide: prices are shared
        client = app.test_client()
        offer = orjson.loads((tmp_path / "mine" / "offer.json").read_bytes())
        made = client.post("/v1/paywall/offers", json=offer, headers=bearer(key))
        assert made.status_code == 201, made.get_json()
        published = client.post(f"/v1/paywall/offers/{offer['offer']}/versions/"
                                f"{made.get_json()['version']}/publish", headers=bearer(key))
        assert published.status_code == 200, published.get_json()  # passes every rule
        sheet = (tmp_path / "mine" / "prices.csv").read_text()
        imported = client.post("/v1/prices/import?format=csv", data=sheet,
                               headers={**bearer(admin), "Content-Type": "text/csv"})
        assert imported.status_code == 201, imported.get_json()
        assert sorted(v["model"] for v in imported.get_json()["data"]) == [
            "gpt-4o-mini", "o3-mini"]
    finally:
        w.engine.dispose()


def test_version() -> None:
    from importlib.metadata import version

    from app import main

    done = CliRunner().invoke(main, ["--version"])
    assert done.exit_code == 0 and done.output == f"meterlane, version {version('meterlane')}\n"


def test_the_front_page_is_a_page_for_browsers_and_json_for_clients(app: Any) -> None:
    client = app.test_client()
    api = client.get("/")
    assert api.status_code == 200 and api.mimetype == "application/json"
    links = api.get_json()["links"]
    for href in links.values():  # every link leads somewhere that answers without a key
        assert client.get(href).status_code == 200, href
    page = client.get("/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert all(f'href="{href}"' in html for href in links.values())
    assert "http://localhost/v1" in html
