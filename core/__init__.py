"""Shared kernel: config, database, errors, auth."""
