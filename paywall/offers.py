"""Offers: what a paywall shows, built from the plan catalog, checked against the rules of
COMPLIANCE.md for every jurisdiction and platform it targets, rendered with the disclosure and
call to action each jurisdiction requires.

Pure functions (no I/O): the service stores versions and serves them. A rule id names each
violation (DSC-01 ... DSC-09, CNS-03, APP-03, GEN-03), with the field at fault.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import orjson

from core import i18n
from core.config import ModelConfig
from plans.catalog import Catalog, Plan
from plans.terms import CreditPack, minor_exponent

# -- jurisdictions (GEN-01) ---------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """What a jurisdiction requires of an offer and its checkout."""

    id: str
    eu_cta: bool = False          # CNS-03: the order button literally says that it costs money
    tax_inclusive: bool = False   # DSC-07
    withdrawal_days: int = 0      # CXL-04 (EU): 14 days
    two_step_cancel: bool = False  # CXL-03 (Germany)
    save_offers: str = "one_with_cancel"  # CXL-02: none | one_with_cancel | ask_first
    locale: str = "en"


PROFILES = {
    "US": Profile("US"),
    "US-CA": Profile("US-CA"),
    "US-NY": Profile("US-NY"),
    "US-CO": Profile("US-CO"),
    "US-MN": Profile("US-MN", save_offers="ask_first"),
    "EU": Profile("EU", eu_cta=True, tax_inclusive=True, withdrawal_days=14, save_offers="none"),
    "EU-DE": Profile("EU-DE", eu_cta=True, tax_inclusive=True, withdrawal_days=14,
                     two_step_cancel=True, save_offers="none", locale="de"),
    "EU-FR": Profile("EU-FR", eu_cta=True, tax_inclusive=True, withdrawal_days=14,
                     save_offers="none", locale="fr"),
    "UK": Profile("UK", tax_inclusive=True, withdrawal_days=14),
}
# Unknown location: every requirement at once (GEN-01).
STRICTEST = Profile("STRICTEST", eu_cta=True, tax_inclusive=True, withdrawal_days=14,
                    two_step_cancel=True, save_offers="none")
EU_COUNTRIES = frozenset("AT BE BG HR CY CZ DK EE FI FR DE GR HU IE IT LV LT LU MT NL PL PT RO "
                         "SK SI ES SE IS LI NO".split())


def known(code: str) -> bool:
    """Whether a target names a jurisdiction (or "*": anywhere else)."""
    return code == "*" or resolve(code) is not STRICTEST


def resolve(jurisdiction: str | None) -> Profile:
    """A profile from a code such as "US-CA", "DE", "EU-FR", "FR", "US"; unknown: strictest."""
    code = (jurisdiction or "").strip().upper()
    if code in PROFILES:
        return PROFILES[code]
    if code.startswith("US-"):
        return PROFILES["US"]  # a state without rules of its own: the federal baseline
    country = code.removeprefix("EU-")
    if country in EU_COUNTRIES:
        return PROFILES.get(f"EU-{country}", PROFILES["EU"])
    if code in ("GB", "UK"):
        return PROFILES["UK"]
    return STRICTEST


TARGETS = tuple(PROFILES) + ("*",)  # "*": anywhere else, checked with the strictest profile
PLATFORMS = ("web", "ios", "android")

# -- copy rules -----------------------------------------------------------------------------------

# CNS-03: order buttons that say that the order costs money, per locale (lowercase prefixes).
PAYMENT_CTAS = {
    "en": ("subscribe and pay", "subscribe - pay", "buy now", "pay now",
           "order with obligation to pay", "subscribe now - pay"),
    "de": ("zahlungspflichtig bestellen", "jetzt kaufen", "kostenpflichtig abonnieren",
           "zahlungspflichtig abonnieren"),
    "fr": ("commander avec obligation de paiement", "s'abonner et payer", "payer maintenant",
           "acheter maintenant"),
}
# DSC-09: decline labels that shame the user.
CONFIRMSHAMING = re.compile(r"\bi (?:don'?t|do not) (?:want|like|need|care)|\bi(?:'d| would) "
                            r"rather (?:pay more|stay|miss|be)|\bi hate\b|\bi prefer (?:to )?"
                            r"(?:pay|lose|miss)|\bich (?:will|möchte) (?:nicht|kein)|"
                            r"\bje ne veux pas", re.IGNORECASE)
UNLIMITED = re.compile(r"\bunlimited\b|\bno limits?\b|\bunbegrenzt\b|\billimité", re.IGNORECASE)
# Linear in the text's length: a number is matched from its first digit only, and no run of
# digits or spaces is ever tried twice (a long run of digits took seconds per search).
SAVINGS = re.compile(r"\bsav(?:e|es|ing|ings)\b|(?<!\d)\d++\s*+%\s*+(?:off|rabatt|de réduction)"
                     r"|[-−]\s*+\d++\s*+%|\bspare\b|\béconomis|\bsparen\b", re.IGNORECASE)
REQUIRED_POLICIES = ("terms_url", "privacy_url", "cancel_policy_url", "refund_policy_url")


@dataclass(frozen=True)
class Violation:
    rule: str
    field: str
    message: str
    target: str  # "US-CA/web" ...

    def as_dict(self) -> dict[str, str]:
        return {"rule": self.rule, "field": self.field, "message": self.message,
                "target": self.target}


def build(draft: dict[str, Any], catalog: Catalog,
          models: tuple[ModelConfig, ...]) -> dict[str, Any]:
    """The offer's full content: the draft's copy and policies, and the billing terms and
    entitlements taken from the plan (or credit pack) the limits engine enforces."""
    content = {k: v for k, v in draft.items() if k != "offer"}
    if draft.get("jurisdictions") is not None:  # "DE", "de", "EU-DE" all name one profile
        content["jurisdictions"] = sorted({t if t == "*" else resolve(t).id
                                           for t in draft["jurisdictions"]})
    kind = draft.get("kind", "subscription")
    content["kind"] = kind
    if kind == "credits":
        pack = catalog.pack(str(draft.get("pack")))
        content["billing"] = _pack_billing(pack) if pack else None
        content["entitlements"] = {"credits": pack.credits} if pack else None
        content["plan"] = None
    else:
        plan = catalog.get(str(draft.get("plan")))
        content["plan"] = {"id": plan.id, "version": plan.version} if plan else None
        content["billing"] = _plan_billing(plan) if plan else None
        content["entitlements"] = entitlements(plan, models) if plan else None
    return content


def content_hash(content: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(content, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _plan_billing(plan: Plan) -> dict[str, Any] | None:
    price = plan.terms.price
    if price is None:
        return None
    return {"amount": price.amount, "currency": price.currency, "interval": price.interval,
            "auto_renews": True, "trial_days": plan.terms.trial_days}


def _pack_billing(pack: CreditPack) -> dict[str, Any]:
    return {"amount": pack.price.amount, "currency": pack.price.currency, "interval": None,
            "auto_renews": False, "trial_days": 0}


def entitlements(plan: Plan, models: tuple[ModelConfig, ...]) -> dict[str, Any]:
    """What the user gets, from the config the limits engine enforces (DSC-05)."""
    terms = plan.terms
    out: dict[str, Any] = {
        "limits": [{"id": lim.id, "metric": lim.metric, "amount": lim.amount,
                    "window": lim.window.spec, "model": lim.model,
                    **({"names": dict(lim.names)} if lim.names else {})}
                   for lim in plan.limits],
        "models": sorted(m.name for m in models if terms.allows_tier(m.tier)),
        "allowance_credits": terms.allowance,
        "overage": None if terms.overage is None else {
            "price_per_1m_credits": terms.overage.price_per_1m,
            "spend_cap": terms.overage.spend_cap},
    }
    return out


def check(content: dict[str, Any]) -> list[Violation]:
    """Every rule, for every target jurisdiction and platform of the offer."""
    out: list[Violation] = []
    targets = content.get("jurisdictions") or ["*"]
    platforms = content.get("platforms") or ["web"]
    for target in targets:
        profile = STRICTEST if target == "*" else resolve(target)
        for platform in platforms:
            out.extend(_check_one(content, profile, platform, f"{target}/{platform}"))
    seen: set[tuple[str, str]] = set()
    unique = []
    for v in out:  # one violation per rule and field: the first target that shows it
        if (v.rule, v.field) not in seen:
            seen.add((v.rule, v.field))
            unique.append(v)
    return unique


def _check_one(c: dict[str, Any], profile: Profile, platform: str,
               target: str) -> list[Violation]:
    out: list[Violation] = []

    def fail(rule: str, field: str, message: str) -> None:
        out.append(Violation(rule, field, message, target))

    billing: dict[str, Any] | None = c.get("billing") if isinstance(c.get("billing"), dict) \
        else None
    kind = c.get("kind")
    # DSC-01: the material terms, before billing information is collected.
    if kind not in ("subscription", "credits"):
        fail("DSC-01", "kind", "kind must be subscription or credits")
    if billing is None:
        fail("DSC-01", "plan" if kind != "credits" else "pack",
             "the offer names no paid plan or credit pack: no amount, currency or interval")
    for field, what in (("cancel_instructions", "how to cancel"),
                        ("min_commitment", "the minimum obligation (e.g. 'none')")):
        if kind == "subscription" and not _text(c.get(field)):
            fail("DSC-01", field, f"{what} must be stated")
    if kind == "subscription" and not _text(c.get("cancel_deadline")):
        fail("DSC-01", "cancel_deadline", "the deadline to cancel must be stated")
    # DSC-02: the disclosure sits beside the call to action.
    template = _dict(c.get("template"))
    if template.get("disclosure_adjacent_to_cta") is not True:
        fail("DSC-02", "template.disclosure_adjacent_to_cta",
             "the disclosure must be a sibling of the call to action, not behind a link")
    # DSC-03: a trial says its length, the price after it, the first charge date, and how
    # to cancel before it.
    trial = _dict(c.get("trial"))
    if billing and billing.get("trial_days"):
        if trial.get("post_trial_amount") != billing.get("amount"):
            fail("DSC-03", "trial.post_trial_amount",
                 "a trial must state the price after it (the plan's billed amount)")
        if not _text(trial.get("cancel_before_text")):
            fail("DSC-03", "trial.cancel_before_text",
                 "a trial must say how to cancel before the first charge")
        if not _text(trial.get("first_charge_date_expr")):
            fail("DSC-03", "trial.first_charge_date_expr",
                 "a trial must state its first charge date (e.g. 'signup + 14 days')")
    # DSC-04: the headline is the amount actually billed, per the billing period.
    headline = _dict(c.get("headline"))
    if billing:
        if headline.get("amount") != billing["amount"] or (
                billing["interval"] and headline.get("interval") != billing["interval"]):
            fail("DSC-04", "headline", "the headline must be the billed amount per billing "
                 f"period ({billing['amount']} per {billing['interval'] or 'purchase'})")
        for i, eq in enumerate(c.get("equivalents") or []):
            if not isinstance(eq, dict) or eq.get("subordinate") is not True:
                fail("DSC-04", f"equivalents.{i}",
                     "a per-month or per-day equivalent must be subordinate to the headline")
    # DSC-05: what the user gets; no "unlimited" when anything is capped.
    ents = c.get("entitlements")
    capped = bool(ents and (ents.get("limits") or ents.get("allowance_credits")
                            or ents.get("credits")))
    for field, text in _texts(c):
        if capped and UNLIMITED.search(text):
            fail("DSC-05", field, "says unlimited, but the plan has limits")
    # DSC-06: cancellation and refund policies.
    refs = _dict(c.get("policy_refs"))
    for key in ("cancel_policy_url", "refund_policy_url"):
        if not _url(refs.get(key)):
            fail("DSC-06", f"policy_refs.{key}", "a versioned policy URL is required")
    # DSC-07: prices include all mandatory fees; tax-inclusive where required.
    if profile.tax_inclusive and c.get("tax_behavior") != "inclusive":
        fail("DSC-07", "tax_behavior",
             f"prices must include tax in {profile.id} (tax_behavior = inclusive)")
    if c.get("fees"):
        fail("DSC-07", "fees", "fees must be in the headline price, not extra line items")
    # DSC-08: working terms and privacy links; the iOS auto-renew block.
    for key in ("terms_url", "privacy_url"):
        if not _url(refs.get(key)):
            fail("DSC-08", f"policy_refs.{key}", "a terms and a privacy link are required")
    if platform == "ios" and kind == "subscription" and \
            template.get("ios_autorenew_block") is not True:
        fail("DSC-08", "template.ios_autorenew_block",
             "an iOS subscription must show Apple's auto-renew text (manage in Settings)")
    # DSC-09: a clear decline; no confirmshaming; no fake urgency.
    if template.get("dismiss") is not True:
        fail("DSC-09", "template.dismiss", "the paywall must have a close / decline control")
    if not _copies(c):
        fail("DSC-09", "copy", "the offer needs copy: a call to action and a decline label, "
             "in at least one locale")
    for locale, copy in _copies(c):
        decline = copy.get("decline_label")
        if not _text(copy.get("cta_label")):
            fail("DSC-01", f"copy.{locale}.cta_label", "a call to action is required")
        if not _text(decline):
            fail("DSC-09", f"copy.{locale}.decline_label", "a decline label is required")
        elif CONFIRMSHAMING.search(_plain(str(decline))):
            fail("DSC-09", f"copy.{locale}.decline_label",
                 "the decline label shames the user (confirmshaming)")
    countdown = template.get("countdown")
    if countdown is not None and not (isinstance(countdown, dict)
                                      and _text(countdown.get("expires_at"))):
        fail("DSC-09", "template.countdown", "a countdown needs a real server-side expires_at")
    # CNS-03: in the EU the order button says that it costs money.
    if profile.eu_cta:
        copies = dict(_copies(c))
        locales = [profile.locale] if profile.id != "STRICTEST" else list(copies) or ["en"]
        for locale in locales:
            label = str(copies.get(locale, {}).get("cta_label") or "")
            allowed = PAYMENT_CTAS.get(locale, PAYMENT_CTAS["en"])
            if not _plain(label).startswith(allowed):
                fail("CNS-03", f"copy.{locale}.cta_label",
                     f"in {profile.id} the order button must signal payment "
                     f"(e.g. {allowed[0]!r}), got {label!r}")
    # APP-03: credit packs are one-time products, never subscriptions.
    if kind == "credits" and (c.get("auto_renews") or headline.get("interval")
                              or (billing and billing.get("interval"))):
        fail("APP-03", "kind", "a credit pack is a one-time (consumable) product, "
             "not a subscription")
    # GEN-03: no savings claim without a real reference price.
    for field, text in _texts(c):
        ref = None
        if field.startswith("claims."):
            claim = (c.get("claims") or [])[int(field.split(".")[1])]
            ref = claim.get("reference_price") if isinstance(claim, dict) else None
        if SAVINGS.search(text) and not (
                isinstance(ref, int) and billing and ref > billing["amount"]):
            fail("GEN-03", field, "a savings claim must be a claim with a real prior price "
                 "(reference_price), higher than the billed amount")
    return out


def _plain(text: str) -> str:
    """Curly apostrophes and dashes as their plain forms, for matching."""
    return (text.replace("\u2019", "'").replace("\u2018", "'").replace("\u2014", "-")
            .replace("\u2013", "-").strip().lower())


def _texts(c: dict[str, Any]) -> list[tuple[str, str]]:
    """Every piece of copy a user reads: (field, text)."""
    out = [(f"copy.{loc}.{key}", text) for loc, copy in _copies(c)
           for key, text in copy.items() if isinstance(text, str)]
    for i, claim in enumerate(c.get("claims") or []):
        text = claim.get("text") if isinstance(claim, dict) else claim
        if isinstance(text, str):
            out.append((f"claims.{i}", text))
    return out


def _copies(c: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    copy = c.get("copy")
    if not isinstance(copy, dict):
        return []
    return [(k, v) for k, v in copy.items() if isinstance(v, dict)]


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _url(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(("https://", "http://")) and \
        len(value) > 10


# -- rendering -------------------------------------------------------------------------------

POLICY_LABELS = {"terms_url": "Terms", "privacy_url": "Privacy",
                 "cancel_policy_url": "Cancellation policy", "refund_policy_url": "Refund policy"}
# material terms an offer may also give per locale, in its copy (else the offer's own)
LOCALIZED_TERMS = ("cancel_instructions", "cancel_deadline", "min_commitment")


def render(content: dict[str, Any], profile: Profile, locale: str | None) -> dict[str, Any]:
    """The disclosure block and call to action an offer shows in one jurisdiction, in the
    user's language (en, de, fr) with prices as that language writes them."""
    copies = dict(_copies(content))
    want = (locale or profile.locale or "en").split("-")[0].lower()
    loc = want if want in copies else ("en" if "en" in copies else next(iter(copies), "en"))
    copy = copies.get(loc, {})
    billing = content.get("billing") or {}
    currency = str(billing.get("currency") or "usd")
    price = i18n.money(int(billing.get("amount") or 0), currency, minor_exponent(currency), loc)
    interval = str(billing.get("interval") or "")
    per = i18n.gettext(loc, interval) if interval in ("month", "year") else ""
    lines = _disclosure(loc, content, copy, price, per, profile)
    cta = str(copy.get("cta_label") or "")
    if profile.eu_cta and not _plain(cta).startswith(PAYMENT_CTAS.get(loc, PAYMENT_CTAS["en"])):
        cta = {"de": "Zahlungspflichtig bestellen",
               "fr": "Commander avec obligation de paiement"}.get(
            loc, f"Subscribe and pay {price}" + (f" per {per}" if per else ""))
    refs = content.get("policy_refs") or {}
    return {"locale": loc, "jurisdiction": profile.id, "headline": copy.get("headline"),
            "price": price, "interval": billing.get("interval"),
            "price_label": i18n.gettext(loc, "{price} per {per}", price=price, per=per)
            if per else price,
            "disclosure": "\n".join(lines), "cta_label": cta,
            "decline_label": copy.get("decline_label"),
            "tax": "included" if content.get("tax_behavior") == "inclusive" else "excluded",
            "withdrawal_days": profile.withdrawal_days or None,
            "policy_refs": refs,
            "policy_links": [{"label": i18n.gettext(loc, POLICY_LABELS.get(k, k)), "url": v}
                             for k, v in refs.items()]}


def _disclosure(loc: str, c: dict[str, Any], copy: dict[str, Any], price: str, per: str,
                profile: Profile) -> list[str]:
    def _(message: str, **values: Any) -> str:
        return i18n.gettext(loc, message, **values)

    billing = c.get("billing") or {}
    ents = c.get("entitlements") or {}
    terms = {k: copy.get(k) or c.get(k) for k in LOCALIZED_TERMS}
    trial_days = billing.get("trial_days") or 0
    renews = billing.get("auto_renews")
    lines = [_("{price} billed every {per}; renews automatically until you cancel.",
               price=price, per=per) if renews else _("{price}, charged once.", price=price)]
    if trial_days:
        before = (c.get("trial") or {}).get("cancel_before_text") if loc == "en" else None
        lines.insert(0, " ".join(filter(None, [
            _("Free for {days} days, then {price} every {per}.", days=trial_days,
              price=price, per=per), copy.get("cancel_before_text") or before])))
    if renews:
        lines.append(_("To cancel: {how} ({deadline}). Minimum term: {term}.",
                       how=terms["cancel_instructions"], deadline=terms["cancel_deadline"],
                       term=terms["min_commitment"]))
    if ents.get("allowance_credits"):
        lines.append(_("Includes {n} credits per month.",
                       n=i18n.number(ents["allowance_credits"], loc)))
    for lim in ents.get("limits") or []:
        if lim["id"] != "allowance":
            names = lim.get("names") or {}
            name = i18n.limit_name(lim["metric"], lim.get("window"), lim.get("model"), loc,
                                   names.get(loc) or names.get("en"))
            lines.append(_("{name}: at most {amount}.", name=name,
                           amount=i18n.number(lim["amount"], loc)))
    if ents.get("models"):
        lines.append(_("Models: {models}.", models=", ".join(ents["models"])))
    if ents.get("credits"):
        lines.append(_("{n} credits.", n=i18n.number(ents["credits"], loc)))
    if profile.withdrawal_days:
        lines.append(_("Right of withdrawal: {days} days.", days=profile.withdrawal_days))
    return lines
