"""Metrics records (JSON lines), run folders, tables and plots."""
