"""Latency runs, trace replay, Belady, reports."""
