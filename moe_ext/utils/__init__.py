"""Helpers shared across moe_ext: atomic file writes (io), plots, timing, run facts."""
