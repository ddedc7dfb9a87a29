"""The spotsafe command line (thin layer over the library)."""
