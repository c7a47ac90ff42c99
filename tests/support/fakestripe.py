"""A fake Stripe API on loopback for tests: localstripe (PyPI, a stateful fake of Stripe's
core objects: customers, products, ...) plus, for what localstripe does not cover, Prices,
Checkout Sessions and Billing Meter Events answered in the shapes Stripe documents
(recorded from its API reference). One process per test session; state in memory only.

Run: python -m tests.support.fakestripe --port 0   (prints "listening on PORT")"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import socket
import time
from typing import Any

from aiohttp import web

_prices: dict[str, dict[str, Any]] = {}
_sessions: dict[str, dict[str, Any]] = {}
_meter_events: list[dict[str, Any]] = []  # every one taken (repeats past the window too)
_DEDUP_SECONDS = 24 * 3600  # Stripe drops a repeated identifier for 24 hours only
_clock = {"offset": 0.0}  # test control: this fake's time runs ahead of the machine's
_hang: dict[str, bool] = {}  # test control: the next meter event hangs (taken first or not)
_hanging = {"now": 0}  # meter event requests hanging now
_meters: dict[str, dict[str, Any]] = {}
_subscriptions: dict[str, dict[str, Any]] = {}
_schedules: dict[str, dict[str, Any]] = {}
_invoices: dict[str, dict[str, Any]] = {}
_refunds: dict[str, dict[str, Any]] = {}  # id -> refund
# idempotency key -> (params, answer)
_replies: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
_failures: dict[str, int] = {}  # "METHOD /path" -> how many more requests fail
MONTH = 30 * 86400


def _error(status: int, message: str, param: str | None = None) -> web.Response:
    return web.json_response({"error": {"type": "invalid_request_error", "message": message,
                                        "param": param}}, status=status)


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


async def _form(request: web.Request) -> dict[str, Any]:
    from localstripe.server import get_post_data

    data: dict[str, Any] = await get_post_data(request)
    return data


async def create_price(request: web.Request) -> web.Response:
    data = await _form(request)
    amount, currency = _int(data.get("unit_amount")), data.get("currency")
    decimal_amount = data.get("unit_amount_decimal")
    if (amount is None and decimal_amount is None) or not currency or not data.get("product"):
        return _error(400, "Missing required param: unit_amount, currency or product.")
    lookup = data.get("lookup_key")
    if lookup:
        holder = next((p for p in _prices.values() if p["lookup_key"] == lookup), None)
        if holder is not None:
            if data.get("transfer_lookup_key") not in ("true", True):
                return _error(400, f"A price (`{holder['id']}`) already uses that lookup key.",
                              "lookup_key")
            holder["lookup_key"] = None
    recurring = data.get("recurring") or None
    price = {"id": _id("price"), "object": "price", "active": True,
             "billing_scheme": "per_unit", "created": int(time.time()), "currency": currency,
             "livemode": False, "lookup_key": lookup, "metadata": data.get("metadata") or {},
             "nickname": data.get("nickname"), "product": data["product"],
             "recurring": ({"interval": recurring.get("interval"),
                            "interval_count": _int(recurring.get("interval_count")) or 1,
                            "usage_type": recurring.get("usage_type", "licensed"),
                            "meter": recurring.get("meter")} if recurring else None),
             "tax_behavior": "unspecified", "type": "recurring" if recurring else "one_time",
             "unit_amount": amount,
             "unit_amount_decimal": str(decimal_amount if amount is None else amount)}
    _prices[price["id"]] = price
    return web.json_response(price)


async def list_prices(request: web.Request) -> web.Response:
    keys = request.query.getall("lookup_keys[]", []) or [
        v for k, v in request.query.items() if k.startswith("lookup_keys[")]
    data = [p for p in _prices.values() if not keys or p["lookup_key"] in keys]
    if request.query.get("active") in ("true", "false"):
        data = [p for p in data if p["active"] == (request.query["active"] == "true")]
    return web.json_response({"object": "list", "url": "/v1/prices", "has_more": False,
                              "data": data})


async def update_price(request: web.Request) -> web.Response:
    price = _prices.get(request.match_info["id"])
    if price is None:
        return _error(404, f"No such price: '{request.match_info['id']}'", "id")
    data = await _form(request)
    if "active" in data:
        price["active"] = data["active"] in ("true", True)
    if "metadata" in data:
        price["metadata"].update(data["metadata"] or {})
    return web.json_response(price)


async def get_price(request: web.Request) -> web.Response:
    price = _prices.get(request.match_info["id"])
    if price is None:
        return _error(404, f"No such price: '{request.match_info['id']}'", "id")
    return web.json_response(price)


async def create_session(request: web.Request) -> web.Response:
    data = await _form(request)
    mode = data.get("mode")
    items = data.get("line_items") or []
    if mode not in ("payment", "subscription", "setup") or not items:
        return _error(400, "Missing required param: mode or line_items.")
    for item in items:
        if item.get("price") not in _prices:
            return _error(400, f"No such price: '{item.get('price')}'", "line_items[0][price]")
    # metered prices (usage billed later) add nothing to what is paid at checkout
    total = sum(_prices[i["price"]]["unit_amount"] * (_int(i.get("quantity")) or 1)
                for i in items if _prices[i["price"]]["unit_amount"] is not None)
    session_id = _id("cs_test")
    session = {"id": session_id, "object": "checkout.session", "mode": mode,
               "status": "open", "payment_status": "unpaid", "livemode": False,
               "url": f"https://checkout.stripe.com/c/pay/{session_id}",
               "success_url": data.get("success_url"), "cancel_url": data.get("cancel_url"),
               "customer": data.get("customer"), "customer_email": data.get("customer_email"),
               "client_reference_id": data.get("client_reference_id"),
               "metadata": data.get("metadata") or {}, "amount_total": total,
               "currency": _prices[items[0]["price"]]["currency"],
               "consent_collection": data.get("consent_collection"),
               "custom_text": data.get("custom_text"),
               "subscription_data": data.get("subscription_data"),
               "expires_at": int(time.time()) + 86400, "created": int(time.time())}
    _sessions[session_id] = session
    return web.json_response(session)


async def get_session(request: web.Request) -> web.Response:
    session = _sessions.get(request.match_info["id"])
    if session is None:
        return _error(404, f"No such checkout.session: '{request.match_info['id']}'", "id")
    return web.json_response(session)


def _now() -> float:
    return time.time() + _clock["offset"]


async def create_meter_event(request: web.Request) -> web.Response:
    data = await _form(request)
    identifier = data.get("identifier") or _id("mev")
    if not data.get("event_name") or not isinstance(data.get("payload"), dict):
        return _error(400, "Missing required param: event_name or payload.")
    stamp = _int(data.get("timestamp")) or int(_now())
    if stamp < _now() - 35 * 86400:  # as Stripe: no events older than 35 days
        return _error(400, "Timestamp must be within the past 35 calendar days.", "timestamp")
    if any(e["identifier"] == identifier and e["created"] > _now() - _DEDUP_SECONDS
           for e in _meter_events):  # Stripe de-duplicates by identifier, for 24 hours
        return _error(400, f"An event with identifier {identifier} already exists.",
                      "identifier")
    event = {"object": "billing.meter_event", "created": int(_now()),
             "event_name": data["event_name"], "identifier": identifier, "livemode": False,
             "payload": data["payload"], "timestamp": _int(data.get("timestamp"))}
    hang = _hang.pop("next", None)
    if hang is not None:  # the caller is to die before it hears back
        if hang:
            _meter_events.append(event)
        _hanging["now"] += 1
        await asyncio.sleep(5)  # long enough to be killed in; short enough to shut down
        _hanging["now"] -= 1
        return _error(500, "The fake hung this request (test control).")
    _meter_events.append(event)
    return web.json_response(event)


async def create_meter_event_adjustment(request: web.Request) -> web.Response:
    """Cancel one meter event by identifier, as Stripe does: only within 24 hours of
    receiving it; a cancelled event leaves the meter's summaries."""
    data = await _form(request)
    identifier = (data.get("cancel") or {}).get("identifier")
    if data.get("type") != "cancel" or not data.get("event_name") or not identifier:
        return _error(400, "Missing required param: event_name, type=cancel or "
                      "cancel[identifier].")
    found = [e for e in _meter_events if e["identifier"] == identifier
             and e["event_name"] == data["event_name"] and not e.get("cancelled")]
    if not found:
        return _error(400, f"No meter event with identifier {identifier} was found.",
                      "cancel[identifier]")
    if found[-1]["created"] < _now() - _DEDUP_SECONDS:
        return _error(400, "You can only cancel events within 24 hours of Stripe receiving "
                      "them.", "cancel[identifier]")
    found[-1]["cancelled"] = True
    return web.json_response({"id": _id("mtr_event_adj"), "object":
                              "billing.meter_event_adjustment", "livemode": False,
                              "status": "pending", "event_name": data["event_name"],
                              "type": "cancel", "cancel": {"identifier": identifier}})


async def hang_next_meter_event(request: web.Request) -> web.Response:
    """Test control: the next meter event is taken (`taken`: true) or not, and never
    answered (its sender is killed meanwhile)."""
    _hang["next"] = bool((await request.json())["taken"])
    return web.json_response({"ok": True})


async def advance_clock(request: web.Request) -> web.Response:
    """Test control: this fake's clock moves `seconds` ahead (de-duplication windows pass)."""
    _clock["offset"] += float((await request.json())["seconds"])
    return web.json_response({"offset": _clock["offset"]})


async def create_meter(request: web.Request) -> web.Response:
    data = await _form(request)
    name = data.get("event_name")
    if not name or not data.get("display_name"):
        return _error(400, "Missing required param: event_name or display_name.")
    if any(m["event_name"] == name and m["status"] == "active" for m in _meters.values()):
        return _error(400, f"An active meter with event_name `{name}` already exists.",
                      "event_name")
    meter = {"id": _id("mtr"), "object": "billing.meter", "created": int(time.time()),
             "display_name": data["display_name"], "event_name": name,
             "status": "active", "livemode": False,
             "default_aggregation": data.get("default_aggregation") or {"formula": "sum"},
             "customer_mapping": data.get("customer_mapping") or {
                 "event_payload_key": "stripe_customer_id", "type": "by_id"},
             "value_settings": data.get("value_settings") or {"event_payload_key": "value"}}
    _meters[meter["id"]] = meter
    return web.json_response(meter)


async def list_meters(request: web.Request) -> web.Response:
    data = [m for m in _meters.values()
            if request.query.get("status") in (None, m["status"])]
    return web.json_response({"object": "list", "url": "/v1/billing/meters",
                              "has_more": False, "data": data})


async def meter_event_summaries(request: web.Request) -> web.Response:
    meter = _meters.get(request.match_info["id"])
    if meter is None:
        return _error(404, f"No such billing.meter: '{request.match_info['id']}'", "id")
    customer = request.query.get("customer")
    start, end = _int(request.query.get("start_time")), _int(request.query.get("end_time"))
    if not customer or start is None or end is None:
        return _error(400, "Missing required param: customer, start_time or end_time.")
    total = 0.0
    for ev in _meter_events:
        if (ev["event_name"] == meter["event_name"] and not ev.get("cancelled")
                and ev["payload"].get("stripe_customer_id") == customer
                and start <= (ev["timestamp"] or ev["created"]) < end):
            total += float(ev["payload"].get("value") or 0)
    summary = {"id": _id("mtrusg"), "object": "billing.meter_event_summary",
               "aggregated_value": total, "start_time": start, "end_time": end,
               "livemode": False, "meter": meter["id"]}
    return web.json_response({"object": "list", "has_more": False, "data": [summary],
                              "url": f"/v1/billing/meters/{meter['id']}/event_summaries"})


async def list_meter_events(request: web.Request) -> web.Response:
    """Not Stripe's API: what the fake received, for tests to compare (GET /_fake/...)."""
    return web.json_response({"data": list(_meter_events), "hanging": _hanging["now"]})


def _sub_item(price_id: str, quantity: Any = None) -> dict[str, Any]:
    price = _prices[price_id]
    metered = (price.get("recurring") or {}).get("usage_type") == "metered"
    return {"id": _id("si"), "object": "subscription_item", "price": price,
            "quantity": None if metered else (_int(quantity) or 1)}


async def create_subscription(request: web.Request) -> web.Response:
    """Subscriptions with Prices (localstripe's take Plans only)."""
    data = await _form(request)
    items = data.get("items") or []
    if not data.get("customer") or not items:
        return _error(400, "Missing required param: customer or items.")
    if any(i.get("price") not in _prices for i in items):
        return _error(400, "No such price.", "items")
    now = int(time.time())
    trial = _int(data.get("trial_period_days")) or 0
    first = _prices[items[0]["price"]].get("recurring") or {}
    term = 365 * 86400 if first.get("interval") == "year" else MONTH
    sub = {"id": _id("sub"), "object": "subscription", "customer": data["customer"],
           "status": "trialing" if trial else "active", "metadata": data.get("metadata") or {},
           "billing_cycle_anchor": now + trial * 86400, "cancel_at_period_end": False,
           "trial_end": now + trial * 86400 if trial else None, "ended_at": None,
           "current_period_start": now, "current_period_end": now + term, "schedule": None,
           "items": {"object": "list", "data": [_sub_item(i["price"], i.get("quantity"))
                                                 for i in items]},
           "latest_proration_behavior": None}
    for item in sub["items"]["data"]:
        item.update(current_period_start=now, current_period_end=now + term)
    _subscriptions[sub["id"]] = sub
    return web.json_response(sub)


async def get_subscription(request: web.Request) -> web.Response:
    sub = _subscriptions.get(request.match_info["id"])
    if sub is None:
        return _error(404, f"No such subscription: '{request.match_info['id']}'", "id")
    return web.json_response(sub)


async def set_subscription_state(request: web.Request) -> web.Response:
    """Test control: what Stripe itself moves a subscription to (status: past_due, ...)."""
    sub = _subscriptions.get(request.match_info["id"])
    if sub is None:
        return _error(404, f"No such subscription: '{request.match_info['id']}'", "id")
    sub.update(await request.json())
    return web.json_response(sub)


async def update_subscription(request: web.Request) -> web.Response:
    sub = _subscriptions.get(request.match_info["id"])
    if sub is None:
        return _error(404, f"No such subscription: '{request.match_info['id']}'", "id")
    data = await _form(request)
    if sub.get("schedule") and "items" in data:
        return _error(400, "The subscription is managed by a subscription schedule.")
    items = sub["items"]["data"]
    for change in data.get("items") or []:
        current = next((i for i in items if i["id"] == change.get("id")), None)
        if change.get("id") and current is None:
            return _error(400, f"No such subscription item: {change['id']}", "items")
        if change.get("deleted") in ("true", True):
            items.remove(current)
        elif current is not None and change.get("price"):
            if change["price"] not in _prices:
                return _error(400, "No such price.", "items")
            current["price"] = _prices[change["price"]]
        elif change.get("price"):
            if change["price"] not in _prices:
                return _error(400, "No such price.", "items")
            items.append(_sub_item(change["price"], change.get("quantity")))
    if sub.get("schedule") and "cancel_at_period_end" in data:
        return _error(400, "The subscription is managed by a subscription schedule.")
    if "cancel_at_period_end" in data:
        sub["cancel_at_period_end"] = data["cancel_at_period_end"] in ("true", True)
    if "proration_behavior" in data:
        sub["latest_proration_behavior"] = data["proration_behavior"]
    sub["metadata"].update(data.get("metadata") or {})
    return web.json_response(sub)


async def cancel_subscription(request: web.Request) -> web.Response:
    """DELETE /v1/subscriptions/{id}: ends it now; a second cancel is an error, as Stripe's
    (a retry with the same idempotency key gets the first answer again)."""
    key = request.headers.get("Idempotency-Key")
    if key and key in _replies:
        return web.json_response(_replies[key][1])
    sub = _subscriptions.get(request.match_info["id"])
    if sub is None:
        return _error(404, f"No such subscription: '{request.match_info['id']}'", "id")
    if sub["status"] == "canceled":
        return _error(400, "This subscription has already been canceled.")
    sub.update(status="canceled", ended_at=int(time.time()), cancel_at_period_end=False)
    if key:
        _replies[key] = ({}, dict(sub))
    return web.json_response(sub)


async def fail_next(request: web.Request) -> web.Response:
    """Test control: the next `times` requests to `route` ("POST /v1/refunds") get a 500."""
    data = await request.json()
    _failures[data["route"]] = int(data["times"])
    return web.json_response({"ok": True})


def _failing(route: str) -> web.Response | None:
    if _failures.get(route, 0) > 0:
        _failures[route] -= 1
        return web.json_response({"error": {"type": "api_error",
                                            "message": "Stripe had a problem (injected)."}},
                                 status=500)
    return None


async def pay_invoice(request: web.Request) -> web.Response:
    """Test control: Stripe invoices a subscription and a PaymentIntent pays it; returns the
    paid invoice as invoice.paid carries it."""
    data = await request.json()
    sub = _subscriptions[data["subscription"]]
    invoice_id = _id("in")
    price = sub["items"]["data"][0]["price"]
    start = _int(data.get("period_start")) or sub["current_period_start"]
    invoice = {"id": invoice_id, "object": "invoice", "customer": sub["customer"],
               "status": "paid", "amount_paid": data["amount"], "currency": price["currency"],
               "parent": {"type": "subscription_details", "subscription_details": {
                   "subscription": sub["id"], "metadata": sub["metadata"]}},
               "lines": {"object": "list", "data": [{"period": {
                   "start": start, "end": start + MONTH}}]},
               "payments": data["payment_intent"]}
    _invoices[invoice_id] = invoice
    return web.json_response(invoice)


async def list_invoice_payments(request: web.Request) -> web.Response:
    invoice = _invoices.get(request.query.get("invoice", ""))
    data = [] if invoice is None else [{
        "id": _id("inpay"), "object": "invoice_payment", "invoice": invoice["id"],
        "amount_paid": invoice["amount_paid"], "currency": invoice["currency"],
        "is_default": True, "status": "paid",
        "payment": {"type": "payment_intent", "payment_intent": invoice["payments"]}}]
    return web.json_response({"object": "list", "data": data, "has_more": False,
                              "url": "/v1/invoice_payments"})


async def create_refund(request: web.Request) -> web.Response:
    """Refunds through localstripe's (a real charge behind a PaymentIntent), never more than
    what is left of the charge; a repeated idempotency key replays the first answer, and with
    other parameters is refused, as Stripe does."""
    from localstripe.resources import Charge, PaymentIntent, Refund, UserError

    failed = _failing("POST /v1/refunds")
    if failed is not None:
        return failed
    data = await _form(request)
    key = request.headers.get("Idempotency-Key")
    if key and key in _replies:
        params, body = _replies[key]
        if params != data:
            return _error(400, "Keys for idempotent requests can only be used with the same "
                          "parameters they were first used with.")
        return web.json_response(body)
    try:
        charge_id = data.get("charge") or PaymentIntent._api_retrieve(
            data.get("payment_intent")).latest_charge.id
        charge = Charge._api_retrieve(charge_id)
        done = sum(r["amount"] for r in _refunds.values() if r["charge"] == charge_id)
        if _int(data.get("amount")) is not None and done + int(data["amount"]) > charge.amount:
            return _error(400, f"Refund amount ({data['amount']}) is greater than unrefunded "
                          f"amount on charge ({charge.amount - done})", "amount")
        refund = Refund(charge=data.get("charge"), payment_intent=data.get("payment_intent"),
                        amount=data.get("amount"), metadata=data.get("metadata"))
    except UserError as exc:
        return exc.to_response()  # type: ignore[no-any-return]
    body = refund._export()
    body["charge"] = charge_id
    _refunds[body["id"]] = body
    if key:
        _replies[key] = (data, body)
    return web.json_response(body)


async def list_refunds(request: web.Request) -> web.Response:
    """GET /v1/refunds (?payment_intent= or ?charge=), newest first."""
    pi, charge = request.query.get("payment_intent"), request.query.get("charge")
    data = [r for r in reversed(_refunds.values())
            if (pi is None or r.get("payment_intent") == pi)
            and (charge is None or r.get("charge") == charge)]
    return web.json_response({"object": "list", "data": data, "has_more": False,
                              "url": "/v1/refunds"})


async def create_schedule(request: web.Request) -> web.Response:
    data = await _form(request)
    sub = _subscriptions.get(data.get("from_subscription") or "")
    if sub is None:
        return _error(400, "from_subscription names no subscription.", "from_subscription")
    if sub.get("schedule"):
        return _error(400, "The subscription already has a schedule.", "from_subscription")
    schedule = {"id": _id("sub_sched"), "object": "subscription_schedule",
                "subscription": sub["id"], "end_behavior": "release", "status": "active",
                "phases": [{"start_date": sub["current_period_start"],
                            "end_date": sub["current_period_end"],
                            "items": [{"price": i["price"]["id"], "quantity": i["quantity"]}
                                      for i in sub["items"]["data"]],
                            "proration_behavior": "create_prorations"}]}
    sub["schedule"] = schedule["id"]
    _schedules[schedule["id"]] = schedule
    return web.json_response(schedule)


async def update_schedule(request: web.Request) -> web.Response:
    schedule = _schedules.get(request.match_info["id"])
    if schedule is None:
        return _error(404, f"No such subscription_schedule: '{request.match_info['id']}'")
    data = await _form(request)
    phases = data.get("phases")
    if phases is not None:
        for phase in phases:
            if any(i.get("price") not in _prices for i in phase.get("items") or []):
                return _error(400, "No such price.", "phases")
        if _int(phases[0].get("start_date")) != schedule["phases"][0]["start_date"]:
            return _error(400, "You can not modify the start date of the current phase.")
        schedule["phases"] = [{**ph, "start_date": _int(ph.get("start_date")),
                               "end_date": _int(ph.get("end_date"))} for ph in phases]
    if data.get("end_behavior"):
        schedule["end_behavior"] = data["end_behavior"]
    return web.json_response(schedule)


async def release_schedule(request: web.Request) -> web.Response:
    schedule = _schedules.get(request.match_info["id"])
    if schedule is None:
        return _error(404, f"No such subscription_schedule: '{request.match_info['id']}'")
    schedule["status"] = "released"
    sub = _subscriptions.get(schedule["subscription"])
    if sub is not None:
        sub["schedule"] = None
    return web.json_response(schedule)


async def get_schedule(request: web.Request) -> web.Response:
    schedule = _schedules.get(request.match_info["id"])
    if schedule is None:
        return _error(404, f"No such subscription_schedule: '{request.match_info['id']}'")
    return web.json_response(schedule)


def build() -> web.Application:
    from localstripe import resources
    from localstripe.server import app

    resources.store.dump_to_disk = lambda: None  # type: ignore[method-assign]
    ours = web.Application(middlewares=app.middlewares)
    ours.router.add_post("/v1/subscriptions", create_subscription)
    ours.router.add_get("/v1/subscriptions/{id}", get_subscription)
    ours.router.add_post("/v1/subscriptions/{id}", update_subscription)
    ours.router.add_delete("/v1/subscriptions/{id}", cancel_subscription)
    ours.router.add_get("/v1/invoice_payments", list_invoice_payments)
    ours.router.add_post("/v1/refunds", create_refund)
    ours.router.add_post("/_config/invoices/pay", pay_invoice)
    ours.router.add_get("/v1/refunds", list_refunds)
    ours.router.add_get("/_config/refunds", list_refunds)
    ours.router.add_post("/_config/fail", fail_next)
    ours.router.add_post("/_config/subscriptions/{id}", set_subscription_state)
    ours.router.add_post("/v1/subscription_schedules", create_schedule)
    ours.router.add_get("/v1/subscription_schedules/{id}", get_schedule)
    ours.router.add_post("/v1/subscription_schedules/{id}", update_schedule)
    ours.router.add_post("/v1/subscription_schedules/{id}/release", release_schedule)
    ours.router.add_post("/v1/prices", create_price)
    ours.router.add_get("/v1/prices", list_prices)
    ours.router.add_get("/v1/prices/{id}", get_price)
    ours.router.add_post("/v1/prices/{id}", update_price)
    ours.router.add_post("/v1/checkout/sessions", create_session)
    ours.router.add_get("/v1/checkout/sessions/{id}", get_session)
    ours.router.add_post("/v1/billing/meter_events", create_meter_event)
    ours.router.add_post("/v1/billing/meter_event_adjustments", create_meter_event_adjustment)
    ours.router.add_post("/v1/billing/meters", create_meter)
    ours.router.add_get("/v1/billing/meters", list_meters)
    ours.router.add_get("/v1/billing/meters/{id}/event_summaries", meter_event_summaries)
    ours.router.add_get("/_config/meter_events", list_meter_events)
    ours.router.add_post("/_config/meter_events/hang", hang_next_meter_event)
    ours.router.add_post("/_config/clock", advance_clock)
    # then localstripe's own routes: ours, registered first, answer where both exist
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if path and route.method != "HEAD":
            ours.router.add_route(route.method, path, route.handler)
    return ours


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(128)  # connections wait in the backlog until the app accepts them
    print(f"listening on {sock.getsockname()[1]}", flush=True)
    web.run_app(build(), sock=sock, print=None, access_log=None)


if __name__ == "__main__":
    main()
