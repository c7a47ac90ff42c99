"""Paywall events and the app's webhook endpoint (problem+json errors)."""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, request

from core import i18n
from core.auth import Role, require_role, validate_user_id
from core.errors import InvalidRequestError, NotFoundError, PermissionDeniedError
from core.events import EventService
from core.openapi import documented
from core.tenancy import TenancyService
from core.text import storable
from core.web import (
    answer_not_kept,
    app_in_scope,
    current_actor,
    current_principal,
    json_body,
    json_response,
    part,
    query_args,
)
from paywall.schemas import (
    ConsentRequestSchema,
    ConsentSchema,
    DeliveriesQuerySchema,
    DeliveryListSchema,
    EventListSchema,
    EventsQuerySchema,
    OfferDraftSchema,
    OffersQuerySchema,
    OfferVersionSchema,
    ServedOffersSchema,
    WebhookEndpointRequestSchema,
    WebhookEndpointSchema,
)
from paywall.service import PaywallService
from plans.service import PlanService

bp = Blueprint("paywall", __name__, url_prefix="/v1")
widget_bp = Blueprint("widget", __name__)
WIDGET = Path(__file__).with_name("widget.js")
# What the widget reads from the app's own pages (another origin): bearer keys, no cookies,
# so any origin may call them.
CORS_PATHS = {"/v1/me/quota": "GET", "/v1/me/credits": "GET", "/v1/paywall/offers": "GET",
              "/v1/paywall/consents": "POST"}


@widget_bp.get("/widget.js")
@documented(summary="The quota widget an app page includes with an end-user key (no CDN)",
            tag="widget", content_type="application/javascript")
def widget() -> Response:
    resp = Response(WIDGET.read_bytes(), mimetype="application/javascript")
    resp.headers["Cache-Control"] = "public, max-age=300"
    resp.headers["Access-Control-Allow-Origin"] = "*"
    return resp


# The widget's own words; a page asks for them in its user's language (no key needed).
WIDGET_TEXTS = {"used": "{n} used", "left": "{n} left", "resets": "resets {when}",
                # a meter's limit: its amounts are in the meter's own unit
                "used_of": "{n} of {limit} {unit} used", "left_unit": "{n} {unit} left",
                "frees": "frees up as running calls end", "decline": "Not now",
                "expired": "Your quota session has expired: reload the page to see your quota.",
                "failed": "The quota could not be loaded ({why})."}


@widget_bp.get("/widget/texts")
@documented(summary="The widget's words in the language of ?locale= (en, de, fr)",
            tag="widget")
def widget_texts() -> Response:
    locale = i18n.pick(request.args.get("locale"))
    resp = json_response({"locale": locale, "texts": {
        k: i18n.gettext(locale, v) for k, v in WIDGET_TEXTS.items()}})
    resp.headers["Cache-Control"] = "public, max-age=300"
    resp.headers["Access-Control-Allow-Origin"] = "*"
    return resp


@bp.after_app_request
def cors(resp: Response) -> Response:
    method = CORS_PATHS.get(request.path)
    if method is not None and request.method in (method, "OPTIONS"):
        resp.headers["Access-Control-Allow-Origin"] = "*"
        resp.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
        resp.headers["Access-Control-Allow-Methods"] = f"{method}, OPTIONS"
        resp.headers["Access-Control-Max-Age"] = "600"
    return resp


@bp.get("/paywall/events")
@documented(summary="Paywall events (a quota reached, a threshold crossed), newest first",
            query=EventsQuerySchema, response=EventListSchema, tag="paywall")
def paywall_events() -> Response:
    principal = current_principal()
    require_role(principal, Role.APP, Role.ADMIN, Role.USER)
    args = EventsQuerySchema().load(query_args())
    app_id = app_in_scope(principal)
    end_user_id = None
    user = args.get("user")
    if principal.role == Role.USER:
        if user is not None and user != principal.end_user:
            raise PermissionDeniedError("An end-user key sees only its own paywall events.")
        end_user_id = principal.end_user_id
    elif user is not None:
        end_user_id = part(TenancyService).find_end_user(app_id, validate_user_id(user))
        if end_user_id is None:
            raise NotFoundError(f"No end user {user!r} in this app.")
    events, more = part(PaywallService).events_of(app_id, end_user_id, args.get("trigger"),
                                              args["limit"], args.get("starting_after"))
    return json_response(EventListSchema().dump({"data": events, "has_more": more}))


@bp.put("/webhooks")
@documented(summary="Set the app's webhook URL (a new or rotated endpoint returns its secret "
                    "once)", body=WebhookEndpointRequestSchema, response=WebhookEndpointSchema,
            tag="webhooks")
@answer_not_kept
def set_webhook() -> Response:
    principal = current_principal()
    require_role(principal, Role.APP, Role.ADMIN)
    args = WebhookEndpointRequestSchema().load(json_body())
    endpoint = part(EventService).set_endpoint(app_in_scope(principal), args["url"],
                                               rotate=args["rotate_secret"],
                                               actor=current_actor())
    return json_response(WebhookEndpointSchema().dump(endpoint))


@bp.get("/webhooks")
@documented(summary="The app's webhook endpoint (its secret is never shown again)",
            response=WebhookEndpointSchema, tag="webhooks")
def get_webhook() -> Response:
    principal = current_principal()
    require_role(principal, Role.APP, Role.ADMIN)
    endpoint = part(EventService).endpoint(app_in_scope(principal))
    if endpoint is None:
        raise NotFoundError("This app has no webhook endpoint; set one with PUT /v1/webhooks.")
    return json_response(WebhookEndpointSchema().dump(endpoint))


@bp.get("/webhooks/deliveries")
@documented(summary="The delivery log: each event sent to the app, with every attempt",
            query=DeliveriesQuerySchema, response=DeliveryListSchema, tag="webhooks")
def deliveries() -> Response:
    principal = current_principal()
    require_role(principal, Role.APP, Role.ADMIN)
    args = DeliveriesQuerySchema().load(query_args())
    data, more = part(EventService).deliveries(app_in_scope(principal), args.get("event"),
                                               args["limit"], args.get("starting_after"))
    return json_response(DeliveryListSchema().dump({"data": data, "has_more": more}))


@bp.post("/paywall/offers")
@documented(summary="A new offer version (a draft): copy and policies; prices and entitlements "
                    "come from the plan", body=OfferDraftSchema, response=OfferVersionSchema,
            status=201, tag="paywall")
def create_offer() -> Response:
    principal = current_principal()
    require_role(principal, Role.APP, Role.ADMIN)
    draft = OfferDraftSchema().load(json_body())
    created = part(PaywallService).create_offer(app_in_scope(principal), draft,
                                                actor=current_actor())
    return json_response(OfferVersionSchema().dump(created), status=201)


@bp.post("/paywall/offers/<offer>/versions/<int:version>/publish")
@documented(summary="Publish an offer version: every rule for every target jurisdiction and "
                    "platform; 422 lists the rule ids and fields it breaks",
            response=OfferVersionSchema, tag="paywall")
def publish_offer(offer: str, version: int) -> Response:
    principal = current_principal()
    require_role(principal, Role.APP, Role.ADMIN)
    published = part(PaywallService).publish_offer(app_in_scope(principal), offer, version,
                                                   actor=current_actor())
    return json_response(OfferVersionSchema().dump(published))


@bp.get("/paywall/offers")
@documented(summary="The published offers for a user, jurisdiction, platform and locale, with "
                    "the disclosure and call to action the jurisdiction requires",
            query=OffersQuerySchema, response=ServedOffersSchema, tag="paywall")
def served_offers() -> Response:
    principal = current_principal()
    require_role(principal, Role.APP, Role.ADMIN, Role.USER)
    args = OffersQuerySchema().load(query_args())
    app_id = app_in_scope(principal)
    end_user_id = principal.end_user_id if principal.role == Role.USER else None
    user = args.get("user")
    if principal.role == Role.USER and user is not None and user != principal.end_user:
        raise PermissionDeniedError("An end-user key sees only its own offers.")
    if end_user_id is None and user is not None:
        end_user_id = part(TenancyService).find_end_user(app_id, validate_user_id(user))
    current = None
    if end_user_id is not None and part(PlanService).catalog.plans:
        current = part(PlanService).plan_of(end_user_id).plan.id
    served = part(PaywallService).served_offers(
        app_id, jurisdiction=args.get("jurisdiction"), platform=args["platform"],
        locale=args.get("locale"), current_plan=current)
    return json_response(ServedOffersSchema().dump(served))


@bp.post("/paywall/consents")
@documented(summary="Record what an end user was shown and agreed to (checked against what "
                    "was served; immutable)", body=ConsentRequestSchema, response=ConsentSchema,
            status=201, tag="paywall")
def record_consent() -> Response:
    principal = current_principal()
    require_role(principal, Role.APP, Role.USER)
    args = ConsentRequestSchema().load(json_body())
    app_id = app_in_scope(principal)
    if principal.role == Role.USER:
        if args.get("user") not in (None, principal.end_user):
            raise PermissionDeniedError("An end-user key consents only for its own user.")
        assert principal.end_user_id is not None
        end_user_id = principal.end_user_id
        # what the server saw, not what a client claims
        args["ip"] = request.remote_addr
        agent = request.headers.get("User-Agent")  # a header: made storable as evidence text
        args["user_agent"] = storable(agent, 500) if agent else None
    else:
        if args.get("user") is None:
            raise InvalidRequestError("Name the end user who agreed (user).", param="user")
        end_user_id = part(TenancyService).ensure_end_user(app_id, validate_user_id(args["user"]))
    recorded = part(PaywallService).record_consent(app_id, end_user_id, args)
    return json_response(ConsentSchema().dump(recorded), status=201)


@bp.get("/paywall/consents/<consent_id>")
@documented(summary="A consent record, read back as evidence", response=ConsentSchema,
            tag="paywall")
def read_consent(consent_id: str) -> Response:
    principal = current_principal()
    require_role(principal, Role.APP, Role.ADMIN)
    return json_response(ConsentSchema().dump(
        part(PaywallService).consent(app_in_scope(principal), consent_id)))
