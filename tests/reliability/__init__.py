"""Reliability and security: faults, load, bad input and secrets (run alone: -m reliability)."""
