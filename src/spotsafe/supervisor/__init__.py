"""Launching, signalling and relaunching jobs (the only package that touches processes)."""
