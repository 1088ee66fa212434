"""Transports: how results reach a destination (base.py says what one is, registry.py lists them)."""
