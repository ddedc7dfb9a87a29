"""The web dashboard (``spotsafe dashboard``): runs, their timelines and reports, read-only."""
