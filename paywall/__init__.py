"""Paywall: events when a user runs out, offers, consent evidence, cancellation."""
