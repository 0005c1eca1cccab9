"""Oracles: upstream code vendored unchanged, run by harnesses on tiny random weights (see harness.py)."""
