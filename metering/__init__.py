"""Metering: tokens, usage ledger, pricing, usage API."""
