"""Corrections of custom meter events: voided or amended by a new meter event naming it
(append-only), through POST /v1/meter/corrections and CloudEvents; the meter's totals, its
limits on both stores (given back in the open window, and after a rebuild) and finance's
meter costs count what the correction leaves."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from metering.models import MeterEvent
from tests.conftest import Keys, bearer
from tests.integration.test_limits_gateway import NOW
from tests.integration.test_meters import EVENTS, event, metered, mkeys

__all__ = ["metered", "mkeys"]  # the fixtures, shared with the meter tests
ONE = "application/cloudevents+json"


def correct(client: Any, key: str, corrects: str, action: str, idem: str,
            **more: Any) -> Any:
    return client.post("/v1/meter/corrections", headers=bearer(key), json={
        "idempotency_key": idem, "corrects": corrects, "action": action, **more})


def searches(client: Any, key: str, user: str = "bea") -> int:
    quota = client.get(f"/v1/users/{user}/quota", headers=bearer(key)).get_json()
    [line] = [x for x in quota["limits"] if x["metric"] == "meter:web_search_calls"]
    return int(line["used"])


def totals(client: Any, key: str, user: str) -> dict[str, dict[str, Any]]:
    body = client.get(f"/v1/users/{user}/meters?from=2000-01-01T00:00:00Z",
                      headers=bearer(key))
    assert body.status_code == 200, body.data
    return {m["meter"]: m for m in body.get_json()["meters"]}


def test_a_void_gives_the_limit_back_and_leaves_the_totals(metered: Any, mkeys: Keys) -> None:
    client = metered.test_client()
    auth = bearer(mkeys.app)
    for n in range(10):
        assert client.post(EVENTS, json=event("bea", "web_search_calls", f"s{n}"),
                           headers=auth).status_code == 201
    assert client.post(EVENTS, json=event("bea", "web_search_calls", "s10"),
                       headers=auth).status_code == 402
    void = correct(client, mkeys.app, "s3", "void", "fix-s3", meter="web_search_calls")
    assert void.status_code == 201, void.data
    assert void.get_json()["value"] == "0" and void.get_json()["meter"] == "web_search_calls"
    assert searches(client, mkeys.app) == 9
    again = correct(client, mkeys.app, "s3", "void", "fix-s3", meter="web_search_calls")
    assert again.status_code == 200 and again.get_json()["outcome"] == "duplicate"
    assert searches(client, mkeys.app) == 9  # given back once
    assert client.post(EVENTS, json=event("bea", "web_search_calls", "s10"),
                       headers=auth).status_code == 201  # room for one more
    found = totals(client, mkeys.app, "bea")["web_search_calls"]
    assert (found["value"], found["events"], found["cost_usd"]) == ("10", 10, "0.1")
    # the ledger keeps both rows; the counters rebuilt from it agree
    metered.extensions["wiring"].limits.rebuild()
    assert searches(client, mkeys.app) == 10
    with metered.extensions["wiring"].engine.connect() as conn:
        rows = {r.idempotency_key: r for r in conn.execute(select(MeterEvent.__table__))}
    assert rows["fix-s3"].supersedes_id == rows["s3"].id and rows["s3"].value_micro == 10**6


def test_an_amendment_counts_instead_and_refusals_are_problems(metered: Any,
                                                               mkeys: Keys) -> None:
    client = metered.test_client()
    auth = bearer(mkeys.app)
    assert client.put("/v1/users/kim/plan", json={"plan": "audio"}, headers=auth
                      ).status_code == 200
    assert client.post(EVENTS, json=event("kim", "audio_seconds", "a1", value="50"),
                       headers=auth).status_code == 201
    amend = correct(client, mkeys.app, "a1", "amend", "fix-a1", meter="audio_seconds",
                    value="12.5")
    assert amend.status_code == 201, amend.data
    assert amend.get_json()["cost_usd"] == "0.0015375"  # 12.5 x 0.000123
    assert amend.get_json()["corrected_cost_usd"] == "0.00615"
    [line] = client.get("/v1/users/kim/quota", headers=auth).get_json()["limits"]
    assert line["used"] == "12.5"
    assert totals(client, mkeys.app, "kim")["audio_seconds"]["value"] == "12.5"
    day = NOW.date().isoformat()
    summary = client.get(f"/v1/finance/summary?period={day}", headers=bearer(mkeys.finance))
    assert summary.get_json()["meter_costs"] == [
        {"meter": "audio_seconds", "events": 1, "cost_usd": "0.0015375"}]

    twice = correct(client, mkeys.app, "a1", "void", "fix-a1b", meter="audio_seconds")
    assert twice.status_code == 409 and twice.get_json()["code"] == "already_corrected"
    wrong_meter = correct(client, mkeys.app, "a1", "void", "fix-a1c",
                          meter="web_search_calls")
    assert wrong_meter.status_code == 409 and wrong_meter.get_json()["code"] == "other_meter"
    theirs = correct(client, mkeys.other_app, "a1", "void", "fix-x", meter="audio_seconds")
    assert theirs.status_code == 404 and theirs.mimetype == "application/problem+json"
    mixed = correct(client, mkeys.app, "a1", "amend", "fix-y", meter="audio_seconds",
                    usage={"input_tokens": 1})
    assert mixed.status_code == 422
    bad = correct(client, mkeys.app, "fix-a1", "amend", "fix-z", meter="audio_seconds",
                  value="-1")
    assert bad.status_code == 409  # a correction is not corrected (before its value is read)


def test_cloudevents_correct_a_meters_events(metered: Any, mkeys: Keys) -> None:
    client = metered.test_client()
    auth = bearer(mkeys.app, **{"Content-Type": ONE})

    def cloud(event_id: str, **more: Any) -> dict[str, Any]:
        return {"specversion": "1.0", "id": event_id, "source": "search",
                "type": "web_search_calls", "subject": "bea", **more}

    for n in range(3):
        assert client.post("/v1/events", headers=auth, json=cloud(f"q{n}", data={})
                           ).status_code == 201
    assert searches(client, mkeys.app) == 3
    void = client.post("/v1/events", headers=auth,
                       json=cloud("q0-void", corrects="q0", correction="void"))
    assert void.status_code == 201 and void.get_json()["corrected"] == 1, void.data
    assert searches(client, mkeys.app) == 2
    assert totals(client, mkeys.app, "bea")["web_search_calls"]["events"] == 2
    unknown = client.post("/v1/events", headers=auth,
                          json=cloud("q9-void", corrects="q9", correction="void"))
    assert unknown.status_code == 404


def test_a_meter_events_correction_is_audited(metered: Any, mkeys: Keys) -> None:
    client = metered.test_client()
    auth = bearer(mkeys.app)
    assert client.post(EVENTS, json=event("bea", "audio_seconds", "a1", value="10"),
                       headers=auth).status_code == 201
    amend = correct(client, mkeys.app, "a1", "amend", "fix-a1", meter="audio_seconds",
                    value="4")
    assert amend.status_code == 201, amend.data
    assert correct(client, mkeys.app, "a1", "amend", "fix-a1", meter="audio_seconds",
                   value="4").status_code == 200  # a replay: no row
    trail = client.get("/v1/audit?action=correction", headers=bearer(mkeys.admin)).get_json()
    [row] = trail["data"]
    assert (row["action"], row["target"], row["actor"]["key_id"], row["app"]) == (
        "correction.amend", {"type": "meter_event", "id": "a1"}, mkeys.app.split("_")[1],
        "acme")
    assert row["before"].items() >= {"user": "bea", "meter": "audio_seconds", "value": "10",
                                     "cost_usd": "0.00123"}.items()
    assert row["after"].items() >= {"idempotency_key": "fix-a1", "value": "4",
                                    "cost_usd": amend.get_json()["cost_usd"]}.items()
