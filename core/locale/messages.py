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
    "{n} of {limit} {unit} used": ("{n} von {limit} {unit} verbraucht",
                                   "{n} sur {limit} {unit} utilisés"),
    "{n} {unit} left": ("{n} {unit} übrig", "{n} {unit} restants"),
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
    # Germany's cancellation button (§312k BGB), German unless the visitor picks a language
    "Not found": ("Nicht gefunden", "Introuvable"),
    "This page does not exist.": ("Diese Seite gibt es nicht.", "Cette page n'existe pas."),
    "Cancel contracts here": ("Verträge hier kündigen", "Résilier les contrats ici"),
    "Here you can cancel your subscription without logging in.": (
        "Hier können Sie Ihr Abonnement kündigen, ohne sich anzumelden.",
        "Ici, vous pouvez résilier votre abonnement sans vous connecter."),
    "Confirm the cancellation": ("Kündigung bestätigen", "Confirmer la résiliation"),
    "Name": ("Name", "Nom"),
    "Email address (for the confirmation)": ("E-Mail-Adresse (für die Bestätigung)",
                                             "Adresse e-mail (pour la confirmation)"),
    "Contract number (from your order confirmation)": (
        "Vertragsnummer (aus Ihrer Bestellbestätigung)",
        "Numéro de contrat (dans votre confirmation de commande)"),
    "Kind of cancellation": ("Art der Kündigung", "Type de résiliation"),
    "ordinary cancellation": ("ordentliche Kündigung", "résiliation ordinaire"),
    "extraordinary cancellation": ("außerordentliche Kündigung", "résiliation extraordinaire"),
    "Effective": ("Zeitpunkt", "Date d'effet"),
    "at the earliest possible date": ("zum nächstmöglichen Zeitpunkt",
                                      "à la première date possible"),
    "Reason (extraordinary cancellation only)": (
        "Grund (nur bei außerordentlicher Kündigung)",
        "Motif (résiliation extraordinaire uniquement)"),
    "Cancel now": ("jetzt kündigen", "résilier maintenant"),
    "Cancellation received": ("Kündigung eingegangen", "Résiliation reçue"),
    "Received: {when}": ("Eingang: {when}", "Reçue le : {when}"),
    "Contract ends: {date}": ("Vertragsende: {date}", "Fin du contrat : {date}"),
    "Reference: {ref}. A confirmation in text form goes to {email}.": (
        "Referenz: {ref}. Eine Bestätigung in Textform geht an {email}.",
        "Référence : {ref}. Une confirmation écrite est envoyée à {email}."),
    "Your cancellation of contract {ref} was received on {stamp}. We will confirm the end "
    "of the contract by email.": (
        "Ihre Kündigung zum Vertrag {ref} ist am {stamp} bei uns eingegangen. Wir bestätigen "
        "Ihnen das Vertragsende per E-Mail.",
        "Votre résiliation du contrat {ref} a été reçue le {stamp}. Nous vous confirmerons "
        "la fin du contrat par e-mail."),
    "Your cancellation of contract {ref} was received on {stamp}. The contract ends on "
    "{end}; {after}": (
        "Ihre Kündigung zum Vertrag {ref} ist am {stamp} bei uns eingegangen. Der Vertrag "
        "endet zum {end}; {after}",
        "Votre résiliation du contrat {ref} a été reçue le {stamp}. Le contrat prend fin le "
        "{end} ; {after}"),
    "no further payments are taken after that.": (
        "danach erfolgen keine weiteren Abbuchungen.", "aucun prélèvement n'a lieu ensuite."),
    "usage beyond your quota until then is billed at the end of the period; no further "
    "payments are taken after that.": (
        "Nutzung über Ihr Kontingent hinaus bis dahin wird zum Periodenende abgerechnet; "
        "danach erfolgen keine weiteren Abbuchungen.",
        "l'utilisation au-delà de votre quota jusqu'à cette date est facturée en fin de "
        "période ; aucun prélèvement n'a lieu ensuite."),
    # the acknowledgment of a subscription (ACK-01) and the notices before charges (NTC)
    "Thank you for subscribing to {plan}.": ("Vielen Dank für Ihr Abonnement von {plan}.",
                                             "Merci de vous être abonné à {plan}."),
    "{price} per {per}; it renews automatically until you cancel.": (
        "{price} pro {per}; es verlängert sich automatisch bis zur Kündigung.",
        "{price} par {per} ; renouvelé automatiquement jusqu'à résiliation."),
    "Your first charge of {price} is on {date}.": (
        "Die erste Abbuchung von {price} erfolgt am {date}.",
        "Le premier prélèvement de {price} a lieu le {date}."),
    "Your first charge of {price} is on {date}, when your {days}-day free trial ends.": (
        "Die erste Abbuchung von {price} erfolgt am {date}, wenn Ihr {days}-tägiger kostenloser "
        "Testzeitraum endet.",
        "Le premier prélèvement de {price} a lieu le {date}, à la fin de votre essai gratuit "
        "de {days} jours."),
    "To cancel: {how} ({deadline}). Cancellation policy: {url}.": (
        "Kündigung: {how} ({deadline}). Kündigungsbedingungen: {url}.",
        "Résiliation : {how} ({deadline}). Conditions de résiliation : {url}."),
    "in your account settings": ("in Ihren Kontoeinstellungen", "dans les paramètres de "
                                 "votre compte"),
    "before the next billing date": ("vor dem nächsten Abrechnungstag",
                                     "avant la prochaine échéance"),
    "account settings": ("Kontoeinstellungen", "paramètres du compte"),
    "Contract reference: {ref}.": ("Vertragsnummer: {ref}.", "Référence du contrat : {ref}."),
    "You may withdraw within {days} days, until {date}; you asked us to start at once, so a "
    "withdrawal refunds the unused part.": (
        "Sie können innerhalb von {days} Tagen widerrufen, bis zum {date}; Sie haben den "
        "sofortigen Beginn verlangt, daher erstattet ein Widerruf den nicht genutzten Teil.",
        "Vous pouvez vous rétracter dans un délai de {days} jours, jusqu'au {date} ; vous "
        "avez demandé à commencer tout de suite, une rétractation rembourse donc la part "
        "non utilisée."),
    "You may withdraw within {days} days, until {date}; a withdrawal refunds what you paid "
    "in full.": (
        "Sie können innerhalb von {days} Tagen widerrufen, bis zum {date}; ein Widerruf "
        "erstattet den vollen gezahlten Betrag.",
        "Vous pouvez vous rétracter dans un délai de {days} jours, jusqu'au {date} ; une "
        "rétractation rembourse l'intégralité de ce que vous avez payé."),
    "To cancel: {how}.": ("Kündigung: {how}.", "Résiliation : {how}."),
    "Your free trial of {name} ends on {date}. Unless you cancel before then, you will be "
    "charged {price} per {per}.": (
        "Ihr kostenloser Testzeitraum von {name} endet am {date}. Wenn Sie nicht vorher "
        "kündigen, werden {price} pro {per} abgebucht.",
        "Votre essai gratuit de {name} se termine le {date}. Sauf résiliation d'ici là, "
        "{price} par {per} vous seront prélevés."),
    "Your {name} subscription renews on {date} for {price} per {per}.": (
        "Ihr Abonnement {name} verlängert sich am {date} für {price} pro {per}.",
        "Votre abonnement {name} se renouvelle le {date} pour {price} par {per}."),
    "A yearly reminder: you subscribe to {name} at {price} per {per}, renewing "
    "automatically.": (
        "Jährliche Erinnerung: Sie haben {name} für {price} pro {per} abonniert, mit "
        "automatischer Verlängerung.",
        "Rappel annuel : vous êtes abonné à {name} pour {price} par {per}, avec "
        "renouvellement automatique."),
    "The price of {name} changes from {price} to {new_price} per {per} on {date}.": (
        "Der Preis von {name} ändert sich am {date} von {price} auf {new_price} pro {per}.",
        "Le prix de {name} passe de {price} à {new_price} par {per} le {date}."),
    "Please use no control characters.": ("Bitte verwenden Sie keine Steuerzeichen.",
                                          "Veuillez n'utiliser aucun caractère de contrôle."),
    "Please give your name.": ("Bitte geben Sie Ihren Namen an.", "Veuillez indiquer votre nom."),
    "Please give a valid email address.": ("Bitte geben Sie eine gültige E-Mail-Adresse an.",
                                           "Veuillez indiquer une adresse e-mail valide."),
    "Please give your contract number.": ("Bitte geben Sie Ihre Vertragsnummer an.",
                                          "Veuillez indiquer votre numéro de contrat."),
    "Kind of cancellation: ordinary or extraordinary.": (
        "Art der Kündigung: ordentlich oder außerordentlich.",
        "Type de résiliation : ordinaire ou extraordinaire."),
    "The reason is too long (1,000 characters at most).": (
        "Der Kündigungsgrund ist zu lang (höchstens 1000 Zeichen).",
        "Le motif est trop long (1 000 caractères au maximum)."),
}

# Words that are the same in the other language (not English left over), for the test that
# looks for English in German and French pages.
SAME_WORD = {"de": {"tokens", "minute", "monat", "name", "per"},
             "fr": {"minutes", "minute", "quota", "minimum", "page", "conditions", "session",
                    "confirmation", "date"}}


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
