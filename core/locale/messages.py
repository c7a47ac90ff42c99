"""The catalogs' source: every message id (English) with its German and French translation.
`python core/locale/messages.py` writes core/locale/<lang>/LC_MESSAGES/meterlane.po from it
(gettext's format, which translators and their tools edit); a test checks they agree."""

from __future__ import annotations

import sys
from pathlib import Path

# id: (de, fr)
MESSAGES: dict[str, tuple[str, str]] = {
    # offer disclosures
    "{price} billed every {per}; renews automatically until you cancel.": (
        "{price} pro {per}, verlängert sich automatisch bis zur Kündigung.",
        "{price} par {per}, renouvelé automatiquement jusqu'à résiliation."),
    "{price}, charged once.": ("{price}, einmalig.", "{price}, paiement unique."),
    "Free for {days} days, then {price} every {per}.": (
        "{days} Tage kostenlos, danach {price} pro {per}.",
        "{days} jours gratuits, puis {price} par {per}."),
    "To cancel: {how} ({deadline}). Minimum term: {term}.": (
        "Kündigung: {how} ({deadline}). Mindestlaufzeit: {term}.",
        "Résiliation : {how} ({deadline}). Engagement minimum : {term}."),
    "Includes {n} credits per month.": ("Enthält {n} Guthabenpunkte pro Monat.",
                                        "Comprend {n} crédits par mois."),
    "{name}: at most {amount}.": ("{name}: höchstens {amount}.",
                                  "{name} : au maximum {amount}."),
    "Models: {models}.": ("Modelle: {models}.", "Modèles : {models}."),
    "{n} credits.": ("{n} Guthabenpunkte.", "{n} crédits."),
    "Right of withdrawal: {days} days.": ("Widerrufsrecht: {days} Tage.",
                                          "Droit de rétractation : {days} jours."),
    "{price} per {per}": ("{price} pro {per}", "{price} par {per}"),
    "month": ("Monat", "mois"),
    "year": ("Jahr", "an"),
    "Terms": ("AGB", "Conditions générales"),
    "Privacy": ("Datenschutz", "Confidentialité"),
    "Cancellation policy": ("Kündigungsbedingungen", "Conditions de résiliation"),
    "Refund policy": ("Erstattungsbedingungen", "Conditions de remboursement"),
    # limits
    "Tokens": ("Tokens", "Jetons"),
    "Requests": ("Anfragen", "Requêtes"),
    "Spending (USD)": ("Ausgaben (USD)", "Dépenses (USD)"),
    "Calls at once": ("Gleichzeitige Aufrufe", "Appels simultanés"),
    "Credits": ("Guthabenpunkte", "Crédits"),
    "per minute": ("pro Minute", "par minute"),
    "per hour": ("pro Stunde", "par heure"),
    "per day": ("pro Tag", "par jour"),
    "per week": ("pro Woche", "par semaine"),
    "per month": ("pro Monat", "par mois"),
    "per billing cycle": ("pro Abrechnungszeitraum", "par période de facturation"),
    "{what} in any {span}": ("{what} in beliebigen {span}",
                             "{what} sur toute période de {span}"),
    "{what} (refilling)": ("{what} (füllt sich wieder auf)", "{what} (se recharge)"),
    "{name} on {model}": ("{name} für {model}", "{name} pour {model}"),
    "Included credits": ("Enthaltene Guthabenpunkte", "Crédits inclus"),
    "{n} minutes": ("{n} Minuten", "{n} minutes"),
    "{n} hours": ("{n} Stunden", "{n} heures"),
    "{n} days": ("{n} Tagen", "{n} jours"),
    "{n} weeks": ("{n} Wochen", "{n} semaines"),
    # the quota widget
    "{n} used": ("{n} verbraucht", "{n} utilisés"),
    "{n} left": ("{n} übrig", "{n} restants"),
    "resets {when}": ("wird zurückgesetzt: {when}", "réinitialisation : {when}"),
    "frees up as running calls end": ("wird frei, sobald laufende Aufrufe enden",
                                      "se libère à la fin des appels en cours"),
    "Not now": ("Nicht jetzt", "Pas maintenant"),
    "Your quota session has expired: reload the page to see your quota.": (
        "Ihre Sitzung ist abgelaufen: Laden Sie die Seite neu, um Ihr Kontingent zu sehen.",
        "Votre session a expiré : rechargez la page pour voir votre quota."),
    "The quota could not be loaded ({why}).": (
        "Das Kontingent konnte nicht geladen werden ({why}).",
        "Le quota n'a pas pu être chargé ({why})."),
}

# Words that are the same in the other language (not English left over), for the test that
# looks for English in German and French pages.
SAME_WORD = {"de": {"tokens", "minute", "monat"},
             "fr": {"minutes", "minute", "quota", "minimum", "page", "conditions", "session"}}


def write(root: Path) -> None:
    from babel.messages.catalog import Catalog
    from babel.messages.pofile import write_po

    for i, lang in enumerate(("de", "fr")):
        catalog = Catalog(locale=lang, project="meterlane", charset="utf-8")
        for msgid, translations in MESSAGES.items():
            catalog.add(msgid, translations[i])
        target = root / lang / "LC_MESSAGES" / "meterlane.po"
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("wb") as fh:
            write_po(fh, catalog, omit_header=False, sort_output=True, width=100)


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
