"""The paywall steps before a subscription checkout, as an app takes them over HTTP: publish an
offer of the plan, fetch it as served, record the user's consent to exactly that (CNS-01)."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from typing import Any

from tests.unit.paywall.test_offer_rules import GOOD

# call(method, path, json body or None) -> (status, json)
Call = Callable[[str, str, Any], tuple[int, Any]]
MANIFEST = {"disclosure_in_viewport": True, "default_state": "unchecked",
            "dismiss_present": True}


def flask_call(client: Any, key: str) -> Call:
    def call(method: str, path: str, body: Any) -> tuple[int, Any]:
        resp = client.open(path, method=method, json=body,
                           headers={"Authorization": f"Bearer {key}"})
        return resp.status_code, resp.get_json()
    return call


def http_call(base: str, key: str) -> Call:
    """The same over HTTP, against a running server at `base` (http://host:port)."""
    import http.client

    import orjson

    def call(method: str, path: str, body: Any) -> tuple[int, Any]:
        conn = http.client.HTTPConnection(base.split("//")[1], timeout=30)
        conn.request(method, path, body=None if body is None else orjson.dumps(body),
                     headers={"Authorization": f"Bearer {key}",
                              "Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, orjson.loads(data) if data else None
    return call


def publish_offer(call: Call, plan: str) -> str:
    """A compliant offer of the plan, published; returns its id."""
    draft = copy.deepcopy(GOOD)
    draft["offer"], draft["plan"] = f"offer-{plan}".lower()[:64], plan
    status, first = call("POST", "/v1/paywall/offers", draft)
    assert status == 201, first
    billing = first["content"]["billing"]
    draft["headline"] = {"amount": billing["amount"], "interval": billing["interval"]}
    draft["trial"] = {"post_trial_amount": billing["amount"],
                      "first_charge_date_expr": f"signup + {billing['trial_days']} days",
                      "cancel_before_text": "Cancel before the trial ends to pay nothing."}
    status, made = call("POST", "/v1/paywall/offers", draft)
    assert status == 201, made
    status, done = call("POST", f"/v1/paywall/offers/{draft['offer']}/versions/"
                        f"{made['version']}/publish", None)
    assert status == 200, done
    return str(draft["offer"])


def consent_for(call: Call, user: str, plan: str, jurisdiction: str = "US-CA",
                locale: str = "en") -> str:
    """The consent id of `user` agreeing to the served offer of `plan`."""
    offer_id = publish_offer(call, plan)
    status, served = call("GET", f"/v1/paywall/offers?user={user}&jurisdiction={jurisdiction}"
                          f"&locale={locale}", None)
    assert status == 200, served
    [offer] = [o for o in served["data"] if o["offer"] == offer_id]
    status, consent = call("POST", "/v1/paywall/consents", {
        "user": user, "type": "auto_renewal", "offer": offer_id, "version": offer["version"],
        "content_hash": offer["content_hash"], "rendered_price": offer["price"],
        "disclosure_sha256": hashlib.sha256(offer["disclosure"].encode()).hexdigest(),
        "jurisdiction": jurisdiction, "locale": locale,
        "render_manifest": {**MANIFEST, "cta_label": offer["cta_label"]},
        "ip": "203.0.113.7", "user_agent": "Mozilla/5.0 (test)"})
    assert status == 201, consent
    return str(consent["consent_id"])
