"""Capturing training state as JSON plus raw tensors (never pickle)."""
