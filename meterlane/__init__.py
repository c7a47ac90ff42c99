"""Meterlane: token metering, limits and paywall billing for AI apps."""
