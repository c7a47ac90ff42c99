"""Unit tests for meterlane.metering."""
