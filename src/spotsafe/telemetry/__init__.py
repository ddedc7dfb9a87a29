"""Typed events, written as JSON lines to the run's event log."""

from spotsafe.telemetry.log import EVENTS_FILE, EventLog, EventSink, read_events

__all__ = ["EVENTS_FILE", "EventLog", "EventSink", "read_events"]
