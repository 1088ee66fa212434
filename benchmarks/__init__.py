"""Benchmarks that print tables (README "Benchmarks"); run each as a script from the repository root."""
