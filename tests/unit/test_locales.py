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
    return "\n".join(parts)


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
