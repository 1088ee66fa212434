"""Engine backends: the ways a bundle's network can run (registry.py lists them, base.py says what one is)."""
