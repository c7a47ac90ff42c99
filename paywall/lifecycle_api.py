"""Buying and after: checkout with the consent it needs (CNS-01), the one-step cancel (CXL-01),
the cancel screen (CXL-02), EU withdrawal (CXL-04), price changes (NTC-04), the evidence bundle
(NET-02); and Germany's public cancellation pages (CXL-03), HTML for people not logged in."""

from __future__ import annotations

from datetime import UTC
from typing import Any
from urllib.parse import quote

from babel.dates import format_date, format_datetime
from flask import Blueprint, Response, render_template, request

from core import i18n
from core.auth import Role, require_operator, require_role, validate_user_id
from core.errors import DomainError, NotFoundError
from core.openapi import documented
from core.tenancy import TenancyService
from core.web import (
    app_in_scope,
    current_actor,
    current_principal,
    json_body,
    json_response,
    part,
    query_args,
)
from paywall.cancel_flow import CancelFlow
from paywall.evidence import EvidenceService
from paywall.notices import NoticeService
from paywall.schemas import (
    CancelScreenQuerySchema,
    CancelScreenSchema,
    EvidenceQuerySchema,
    EvidenceSchema,
    PriceChangeListSchema,
    PriceChangeQuerySchema,
    PriceChangeRequestSchema,
    PriceChangeSchema,
    WithdrawalRequestSchema,
    WithdrawalSchema,
)
from paywall.service import PaywallService
from paywall.withdrawals import WithdrawalService
from plans.checkout import CheckoutService
from plans.schemas import (
    CancelRequestSchema,
    CheckoutRequestSchema,
    CheckoutSessionSchema,
    SubscriptionChangeSchema,
)
from plans.service import PlanService

bp = Blueprint("lifecycle", __name__, url_prefix="/v1")
kuendigen_bp = Blueprint("kuendigen", __name__, template_folder="templates")


@bp.get("/subscriptions/<sub_id>/cancel-screen")
@documented(summary="What the cancel screen shows: the cancel button, and a save offer only "
            "where the user's jurisdiction allows one (CXL-02)", query=CancelScreenQuerySchema,
            response=CancelScreenSchema, tag="billing")
def cancel_screen(sub_id: str) -> Response:
    principal = current_principal()
    require_role(principal, Role.APP, Role.ADMIN)
    args = CancelScreenQuerySchema().load(query_args())
    screen = part(CancelFlow).screen(
        app_in_scope(principal), sub_id, jurisdiction=args.get("jurisdiction"),
        locale=args.get("locale"), platform=args["platform"],
        offers_welcome=args["offers"] == "yes")
    return json_response(CancelScreenSchema().dump(screen))


@bp.post("/withdrawals")
@documented(summary="Withdraw from a subscription within the EU/UK withdrawal period: it ends "
            "at once and the refund is computed (CXL-04)", body=WithdrawalRequestSchema,
            response=WithdrawalSchema, status=201, tag="billing")
def withdraw() -> Response:
    principal = current_principal()
    require_role(principal, Role.APP)
    args = WithdrawalRequestSchema().load(json_body())
    view, made = part(WithdrawalService).withdraw(app_in_scope(principal), args["subscription"],
                                                  actor=current_actor())
    return json_response(WithdrawalSchema().dump({**view, "already_withdrawn": not made}),
                         status=201 if made else 200)


@bp.post("/price-changes")
@documented(summary="Schedule a plan version's subscribers onto a new price (at least 30 days "
            "ahead: NTC-04)", body=PriceChangeRequestSchema, response=PriceChangeSchema,
            status=201, tag="plans")
def schedule_price_change() -> Response:
    require_operator(current_principal())  # a plan's price: every app selling it
    args = PriceChangeRequestSchema().load(json_body())
    change = part(NoticeService).schedule_price_change(
        args["plan"], args["to_version"], args["effective_at"], args.get("from_version"),
        actor=current_actor())
    return json_response(PriceChangeSchema().dump(change), status=201)


@bp.get("/price-changes")
@documented(summary="Scheduled price changes, in the order they were made",
            query=PriceChangeQuerySchema, response=PriceChangeListSchema, tag="plans")
def list_price_changes() -> Response:
    require_role(current_principal(), Role.ADMIN)
    args = PriceChangeQuerySchema().load(query_args())
    changes, more = part(NoticeService).price_changes(args["limit"], args.get("starting_after"))
    return json_response(PriceChangeListSchema().dump({"data": changes, "has_more": more}))


@bp.get("/compliance/evidence")
@documented(summary="Everything recorded about one subscription, ready for a dispute (NET-02)",
            query=EvidenceQuerySchema, response=EvidenceSchema, tag="paywall")
def evidence() -> Response:
    principal = current_principal()
    require_role(principal, Role.APP, Role.ADMIN)
    args = EvidenceQuerySchema().load(query_args())
    return json_response(EvidenceSchema().dump(
        part(EvidenceService).bundle(app_in_scope(principal), args["subscription"])))


# -- Germany: the cancellation button (CXL-03), no login ------------------------------------------

@bp.post("/checkout/sessions")
@documented(summary="Start a Stripe Checkout for an end user: a plan or a credit pack",
            body=CheckoutRequestSchema, response=CheckoutSessionSchema, status=201,
            tag="billing")
def create_checkout() -> Response:
    principal = current_principal()
    require_role(principal, Role.APP)
    args = CheckoutRequestSchema().load(json_body())
    app_id = app_in_scope(principal)
    user = validate_user_id(args["user"])
    end_user_id = part(TenancyService).ensure_end_user(app_id, user)
    consent = None
    plan = part(PlanService).catalog.get(args["plan"]) if args.get("plan") else None
    if plan is not None and plan.terms.price is not None and not plan.terms.retired \
            and args.get("credit_pack") is None:
        part(CheckoutService).ensure_not_subscribed(end_user_id)  # before asking for consent
        # CNS-01: no subscription checkout without the user's recorded consent to its terms
        consent = part(PaywallService).claim_consent(app_id, end_user_id, args.get("consent_id"),
                                                 args["plan"])
    try:
        session = part(CheckoutService).create(
            app_id=app_id, end_user_id=end_user_id, user=user, plan_id=args.get("plan"),
            pack_id=args.get("credit_pack"), success_url=args["success_url"],
            cancel_url=args["cancel_url"], consent=consent)
    except BaseException:
        if consent is not None:  # the checkout did not start: the consent may be used again
            part(PaywallService).link_consent(consent["consent_id"], None)
        raise
    if consent is not None:
        part(PaywallService).link_consent(consent["consent_id"], session.id)
    return json_response(CheckoutSessionSchema().dump(session.__dict__), status=201)


@bp.post("/subscriptions/<sub_id>/cancel")
@documented(summary="Cancel a subscription at the end of its paid period",
            response=SubscriptionChangeSchema, tag="billing")
def cancel_subscription(sub_id: str) -> Response:
    """One step (CXL-01): cancel at the end of the paid period, with a confirmation record
    and its event at once (CXL-05). Idempotent: a second cancel changes nothing and returns
    the first confirmation."""
    principal = current_principal()
    require_role(principal, Role.APP)
    args = CancelRequestSchema().load(json_body(allow_empty=True))
    confirmation, before = part(CancelFlow).cancel(app_in_scope(principal), sub_id,
                                                   args["channel"], args["steps"],
                                                   current_actor())
    return json_response(SubscriptionChangeSchema().dump({
        "subscription": sub_id, "action": "cancel_scheduled", "plan": confirmation["plan"],
        "effective_at": confirmation["effective_at"], "already_cancelled": before,
        "confirmation": confirmation}))


LANGUAGES = (("de", "Deutsch"), ("en", "English"), ("fr", "Français"))


def _page(step: str, title: str, status: int = 200, **context: Any) -> Response:
    """A page of the cancellation button (Germany's §312k BGB: in German unless the visitor
    picks English or French with ?lang=)."""
    lang = _lang()

    def _(message: str, **values: Any) -> str:
        return i18n.gettext(lang, message, **values)

    doc = render_template("kuendigen.html", step=step, title=_(title), lang=lang, _=_,
                          languages=LANGUAGES, **context)
    resp = Response(doc, status=status, mimetype="text/html")
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["Content-Security-Policy"] = "default-src 'none'; style-src 'unsafe-inline'; " \
        "form-action 'self'"
    return resp


def _lang() -> str:
    chosen = request.args.get("lang") or "de"
    return chosen if chosen in ("de", "en", "fr") else "de"


def _app_or_404(app: str) -> int | Response:
    try:
        return part(CancelFlow).app_named(app)
    except NotFoundError:
        return _page("missing", "Not found", 404)


def _confirm_url(app: str) -> str:
    return f"/kuendigen/{quote(app, safe='')}/bestaetigen"


@kuendigen_bp.get("/kuendigen/<app>")
@documented(summary="Germany's cancellation button, first step (no login): 'Verträge hier "
            "kündigen' (CXL-03)", tag="billing", content_type="text/html")
def kuendigen(app: str) -> Response:
    found = _app_or_404(app)
    if isinstance(found, Response):
        return found
    return _page("start", "Cancel contracts here", confirm_url=_confirm_url(app))


@kuendigen_bp.get("/kuendigen/<app>/bestaetigen")
@documented(summary="Germany's cancellation button, confirmation page: identity, contract, "
            "'jetzt kündigen' (CXL-03)", tag="billing", content_type="text/html")
def kuendigen_form(app: str) -> Response:
    found = _app_or_404(app)
    if isinstance(found, Response):
        return found
    return _page("form", "Confirm the cancellation", confirm_url=_confirm_url(app), values={})


@kuendigen_bp.post("/kuendigen/<app>/bestaetigen")
@documented(summary="Germany's cancellation button: the declaration, confirmed on receipt "
            "(CXL-03)", tag="billing", content_type="text/html")
def kuendigen_submit(app: str) -> Response:
    found = _app_or_404(app)
    if isinstance(found, Response):
        return found
    values: dict[str, Any] = {k: request.form.get(k, "")[:2000] for k in (
        "name", "email", "contract_ref", "kind", "reason")}
    # Past the rate limit a declaration is still received and recorded (the law wants every
    # one confirmed); it is just not matched to a contract here: the app handles it.
    throttled = not part(CancelFlow).allowed(app, request.remote_addr or "-")
    lang = _lang()
    try:
        done = part(CancelFlow).declare(found, values, throttled=throttled, lang=lang)
    except DomainError as exc:
        if exc.status >= 500:
            raise
        return _page("form", "Confirm the cancellation", 400, confirm_url=_confirm_url(app),
                     values=values, error=exc.detail)
    received = format_datetime(done["received_at"], "medium", tzinfo=UTC, locale=lang) + " (UTC)"
    ends = format_date(done["ends_at"], "medium", locale=lang) if done["ends_at"] else None
    return _page("done", "Cancellation received", done=done, received=received, ends=ends)
