"""Unit tests for metering."""
