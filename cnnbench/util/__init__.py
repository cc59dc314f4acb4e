"""Leaf helpers that know nothing of the rest of cnnbench: atomic files, Ctrl-C handling,
run-state paths and value formatting."""
