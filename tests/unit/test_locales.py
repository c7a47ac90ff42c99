"""Every word an end user reads is in their language: the offer's disclosure, its policy
links, the limits' names and the widget's words, rendered in en, de and fr; in German and
French no English word of the catalogs is left (product, plan and model names aside)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from core import i18n
from core.locale.messages import MESSAGES, SAME_WORD, write
from paywall.api import WIDGET_TEXTS
from paywall.offers import build, render, resolve
from tests.unit.paywall.test_offer_rules import GOOD, MODELS, PLANS

ENGLISH = {w.lower() for msgid in MESSAGES for w in re.findall(
    r"[A-Za-z]{3,}", re.sub(r"\{\w+\}", " ", msgid))}
LIMITS = [("tokens", "day", None), ("requests", "minute", None), ("cost_usd", "cycle", None),
          ("concurrent", None, None), ("tokens", "rolling:5h", "o3-mini"),
          ("tokens", "bucket:1000/1m", None), ("tokens", "week", None)]


def localized_offer() -> dict:
    draft = copy.deepcopy(GOOD)
    for lang, terms in {"de": ("Einstellungen > Abo > Kündigen", "vor dem nächsten "
                               "Abrechnungstag", "keine"),
                        "fr": ("Paramètres > Abonnement > Résilier", "avant la prochaine "
                               "échéance", "aucun")}.items():
        draft["copy"][lang].update(zip(("cancel_instructions", "cancel_deadline",
                                        "min_commitment"), terms, strict=True))
    return build(draft, PLANS, MODELS)


def shown_text(lang: str) -> str:
    """What an end user reads in one language: the disclosure and price, the policy links'
    labels, the limits' names, the widget's words."""
    offer = render(localized_offer(), resolve({"de": "EU-DE", "fr": "EU-FR"}.get(
        lang, "US-CA")), lang)
    parts = [offer["disclosure"], offer["price_label"], offer["cta_label"],
             *(link["label"] for link in offer["policy_links"])]
    parts += [i18n.limit_name(m, w, model, lang) for m, w, model in LIMITS]
    parts += [i18n.gettext(lang, text) for text in WIDGET_TEXTS.values()]
    return re.sub(r"\{\w+\}", "", "\n".join(parts))  # (the widget fills its placeholders)


@pytest.mark.parametrize("lang", ["de", "fr"])
def test_no_english_is_left_in_german_or_french(lang: str) -> None:
    text = shown_text(lang)
    words = {w.lower() for w in re.findall(r"[^\W\d_]{3,}", text)}
    left = sorted(words & ENGLISH - SAME_WORD[lang] - {"pro", "gpt", "mini", "usd"})
    assert not left, f"English in {lang}: {left}\n{text}"


def test_the_checker_finds_english_left_over() -> None:
    assert {"billed", "every", "used", "left"} <= ENGLISH
    words = {w.lower() for w in re.findall(r"[^\W\d_]{3,}", shown_text("en"))}
    assert len(words & ENGLISH) > 20  # the English page is made of those words


def test_money_and_numbers_are_written_as_each_language_does() -> None:
    assert i18n.money(2000, "eur", 2, "de") == "20,00\xa0€"
    assert i18n.money(2000, "usd", 2, "fr") == "20,00\xa0$US"
    assert i18n.money(2000, "usd", 2, "en") == "20.00 USD"
    assert i18n.money(500, "jpy", 0, "de") == "500\xa0¥"
    assert i18n.number(1_000_000, "de") == "1.000.000"
    assert i18n.limit_name("tokens", "day", None, "de") == "Tokens pro Tag"
    assert i18n.limit_name("tokens", "rolling:5h", "o3-mini", "fr") == \
        "Jetons sur toute période de 5 heures pour o3-mini"


def test_the_catalogs_are_the_messages(tmp_path: Path) -> None:
    """core/locale/<lang>/LC_MESSAGES/meterlane.po is what messages.py writes (regenerate
    with `python core/locale/messages.py` after changing a message)."""
    write(tmp_path)
    for lang in ("de", "fr"):
        ours = (Path(i18n.CATALOGS) / lang / "LC_MESSAGES" / "meterlane.po").read_text()
        fresh = (tmp_path / lang / "LC_MESSAGES" / "meterlane.po").read_text()
        strip = re.compile(r'^"(POT-Creation-Date|PO-Revision-Date).*$', re.M)
        assert strip.sub("", ours) == strip.sub("", fresh), lang
        assert i18n.messages(lang) == {k: v[("de", "fr").index(lang)]
                                       for k, v in MESSAGES.items()}


@pytest.mark.parametrize("lang", ["de", "fr"])
def test_notices_before_charges_are_in_the_subscribers_language(lang: str) -> None:
    from datetime import UTC, datetime

    from paywall.notices import ANNUAL, PRICE, RENEWAL, Due, _text

    plan = next(p for p in PLANS.plans if p.id == "annual")
    facts = {"amount": "96.00 USD", "interval": "year", "first_charge_date": "2027-01-06",
             "renews_at": "2027-01-06", "new_amount": "120.00 USD",
             "new_amount_minor": 12000, "effective_at": "2027-02-01"}
    at = datetime(2027, 1, 6, tzinfo=UTC)
    how = {"de": "Einstellungen > Abo > Kündigen",
           "fr": "Paramètres > Abonnement > Résilier"}[lang]
    texts = [_text(Due(kind, "x", at, window, facts), plan, how, lang) for kind, window in (
        ("trial_ending", RENEWAL), ("renewal_upcoming", RENEWAL),
        ("annual_reminder", ANNUAL), ("price_change", PRICE))]
    text = "\n".join(texts)
    words = {w.lower() for w in re.findall(r"[^\W\d_]{3,}", text)}
    left = sorted(words & ENGLISH - SAME_WORD[lang] - {"annual"})
    assert not left, f"English in {lang}: {left}\n{text}"
    assert ("96,00\xa0$" if lang == "de" else "96,00\xa0$US") in texts[1]
    assert ("6. Januar 2027" if lang == "de" else "6 janvier 2027") in texts[1]
    assert "120,00" in texts[3]
    english = [_text(Due("renewal_upcoming", "x", at, RENEWAL, facts), plan, "Settings",
                     "en")]
    assert english == ["Your annual subscription renews on 2027-01-06 for 96.00 USD per "
                       "year. To cancel: Settings."]


def test_a_plan_may_name_its_limits_in_each_language() -> None:
    """The plan's own words for a limit win over the made-up name; renaming a limit is not a
    change of the terms (the plan's content hash stays)."""
    from core.costs import ConfigError
    from plans.catalog import parse_plans
    from plans.versions import content_hash

    def plan(name: object = None) -> object:
        limit = {"metric": "tokens", "window": "day", "amount": 5000}
        if name is not None:
            limit["name"] = name
        [found] = parse_plans(({"id": "free", "default": True, "limits": [limit]},), "",
                              frozenset({"gpt-4o-mini"}), frozenset({"standard"})).plans
        return found

    named = plan({"en": "Daily tokens", "de": "Tokens am Tag"})
    [limit] = named.limits
    assert limit.name_in("de") == "Tokens am Tag" and limit.name_in("fr") == "Daily tokens"
    assert i18n.limit_name(limit.metric, "day", None, "de", limit.name_in("de")) == \
        "Tokens am Tag"
    assert plan("Daily tokens").limits[0].name_in("de") == "Daily tokens"
    assert content_hash(named) == content_hash(plan())
    with pytest.raises(ConfigError, match="name must be text"):
        plan({"german": "x"})
    draft = copy.deepcopy(GOOD)
    shown = render(build(draft, PLANS, MODELS), resolve("EU-DE"), "de")
    assert "Tokens pro Tag: höchstens 200.000." in shown["disclosure"]
