"""Benchmarks: scripts that print measurements side by side from one run (not timed tests)."""
