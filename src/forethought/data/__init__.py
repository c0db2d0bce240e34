"""Corpora and the on-disk activation store."""
