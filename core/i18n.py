"""Words an end user reads, in their language: gettext catalogs (core/locale/<lang>/
LC_MESSAGES/meterlane.po, English message ids) and Babel's formats for money, numbers and
dates per locale ("20,00 €", "1.000.000")."""

from __future__ import annotations

import functools
from decimal import Decimal
from pathlib import Path
from typing import Any

from babel import Locale
from babel.messages.catalog import Catalog
from babel.messages.pofile import read_po
from babel.numbers import format_currency, format_decimal

LOCALES = ("en", "de", "fr")
CATALOGS = Path(__file__).with_name("locale")


def pick(locale: str | None) -> str:
    """The supported language of a locale ("de-AT" -> "de"); English otherwise."""
    lang = (locale or "en").replace("_", "-").split("-")[0].lower()
    return lang if lang in LOCALES else "en"


@functools.cache
def _catalog(lang: str) -> Catalog | None:
    path = CATALOGS / lang / "LC_MESSAGES" / "meterlane.po"
    if not path.is_file():
        return None
    with path.open("rb") as fh:
        return read_po(fh, locale=lang)


def gettext(locale: str | None, message: str, **values: Any) -> str:
    """The message in the locale's language (the English id when it has no translation),
    its {placeholders} filled."""
    catalog = _catalog(pick(locale))
    found = catalog.get(message) if catalog is not None else None
    text = found.string if found is not None and found.string else message
    return str(text).format(**values) if values else str(text)


def messages(lang: str) -> dict[str, str]:
    """Every message id of a language's catalog and its translation (for tests and tools)."""
    catalog = _catalog(lang)
    return {} if catalog is None else {
        str(m.id): str(m.string) for m in catalog if m.id and isinstance(m.id, str)}


def money(amount_minor: int, currency: str, places: int, locale: str | None) -> str:
    """An amount in minor units as the locale writes it: 2000 EUR -> "20,00 €" (de),
    "20,00 €" (fr); English keeps the unambiguous "20.00 USD"."""
    lang = pick(locale)
    if lang == "en":  # exact: integer arithmetic
        sign = "-" if amount_minor < 0 else ""
        major, minor = divmod(abs(amount_minor), 10**places)
        body = f"{major:,}.{minor:0{places}d}" if places else f"{major:,}"
        return f"{sign}{body} {currency.upper()}"
    value = Decimal(amount_minor).scaleb(-places)
    return str(format_currency(value, currency.upper(), locale=Locale.parse(lang)))


def number(value: int | Decimal, locale: str | None) -> str:
    return str(format_decimal(value, locale=Locale.parse(pick(locale))))


WINDOWS = {"minute": "per minute", "hour": "per hour", "day": "per day", "week": "per week",
           "month": "per month", "cycle": "per billing cycle"}
METRICS = {"tokens": "Tokens", "requests": "Requests", "cost_usd": "Spending (USD)",
           "concurrent": "Calls at once", "credits": "Credits"}


def limit_name(metric: str, window: str | None, model: str | None, locale: str | None,
               given: str | None = None) -> str:
    """A limit's readable name ("Tokens per day", "Tokens in any 5 hours"); the plan's own
    name for it when it gives one."""
    if given:
        return given
    what = gettext(locale, METRICS.get(metric, metric))
    w = window or ""
    if w in WINDOWS:
        name = f"{what} {gettext(locale, WINDOWS[w])}"
    elif w.startswith("rolling:"):
        name = gettext(locale, "{what} in any {span}", what=what, span=_span(w[8:], locale))
    elif w.startswith("bucket:"):
        name = gettext(locale, "{what} (refilling)", what=what)
    else:
        name = what
    if model:
        name = gettext(locale, "{name} on {model}", name=name, model=model)
    return name


def _span(text: str, locale: str | None) -> str:
    units = {"m": "{n} minutes", "h": "{n} hours", "d": "{n} days", "w": "{n} weeks"}
    n, unit = text[:-1], text[-1:]
    if unit in units and n.isdigit():
        return gettext(locale, units[unit], n=n)
    return text
