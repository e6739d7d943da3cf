"""Execution: the single-process tick engine and the distributed runtime."""
