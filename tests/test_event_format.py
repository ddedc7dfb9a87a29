"""The event log's line format is pinned: every event type, its field names and their order.

The lines below were written by the event catalogue before it became a package
(``telemetry/events.py``, one line per type with every field set). Parsing a line and
writing the event again must give the same bytes: a field renamed, dropped or moved
(a shared base changes the order) fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from spotsafe.telemetry import events as ev
from spotsafe.telemetry.log import EventLog, RunIdentity, parse_lines

GOLDEN = """\
{"type":"run_started","run_id":"run-1","attempt":2,"pid":345,"time":1700000000.25,"url":"url-v","host":"host-v","unit":"unit-v"}
{"type":"run_exited","run_id":"run-1","attempt":2,"pid":345,"time":1700000000.25,"reason":"reason-v","step":12,"exit_code":13}
{"type":"progress","run_id":"run-1","attempt":2,"pid":345,"time":1700000000.25,"step":11,"epoch":12}
{"type":"save_started","run_id":"run-1","attempt":2,"pid":345,"time":1700000000.25,"step":11,"reason":"reason-v"}
{"type":"save_staged","run_id":"run-1","attempt":2,"pid":345,"time":1700000000.25,"step":11,"checkpoint":"checkpoint-v","reason":"reason-v","bytes":14,"stall_s":5.5,"copied_bytes":16,"staging_bytes":17,"overlapped":true}
{"type":"save_skipped","run_id":"run-1","attempt":2,"pid":345,"time":1700000000.25,"step":11,"reason":"reason-v","why":"why-v"}
{"type":"save_committed","run_id":"run-1","attempt":2,"pid":345,"time":1700000000.25,"step":11,"checkpoint":"checkpoint-v","reason":"reason-v","bytes":14,"blobs":15,"stall_s":6.5,"duration_s":7.5,"written_bytes":18,"route":"route-v","local_s":10.5,"upload_s":11.5}
{"type":"save_failed","run_id":"run-1","attempt":2,"pid":345,"time":1700000000.25,"step":11,"reason":"reason-v","error":"error-v"}
{"type":"restore_completed","run_id":"run-1","attempt":2,"pid":345,"time":1700000000.25,"step":11,"epoch":12,"checkpoint":"checkpoint-v","bytes":14,"duration_s":5.5,"last_known_step":16,"replayed_steps":17,"in_place_bytes":18}
{"type":"restore_fresh","run_id":"run-1","attempt":2,"pid":345,"time":1700000000.25,"skipped":11}
{"type":"restore_failed","run_id":"run-1","attempt":2,"pid":345,"time":1700000000.25,"checkpoints":11,"reason":"reason-v"}
{"type":"checkpoint_skipped","run_id":"run-1","attempt":2,"pid":345,"time":1700000000.25,"checkpoint":"checkpoint-v","step":12,"reason":"reason-v"}
{"type":"checkpoint_deleted","run_id":"run-1","attempt":2,"pid":345,"time":1700000000.25,"checkpoint":"checkpoint-v","step":12,"reason":"reason-v"}
{"type":"partial_removed","run_id":"run-1","attempt":2,"pid":345,"time":1700000000.25,"path":"path-v"}
{"type":"notice_received","run_id":"run-1","attempt":2,"pid":345,"time":1700000000.25,"source":"source-v","count":12,"step":13,"deadline":4.5,"kind":"kind-v","detail":"detail-v"}
{"type":"notice_source","run_id":"run-1","attempt":2,"pid":345,"time":1700000000.25,"source":"source-v","status":"status-v","message":"message-v"}
{"type":"emergency_planned","run_id":"run-1","attempt":2,"pid":345,"time":1700000000.25,"step":11,"source":"source-v","deadline":3.5,"time_left_s":4.5,"choice":"choice-v","estimate_s":6.5,"options":{"incremental":1.25,"full":null},"reason":"reason-v"}
{"type":"emergency_finished","run_id":"run-1","attempt":2,"pid":345,"time":1700000000.25,"step":11,"choice":"choice-v","committed":true,"deadline":4.5,"before_deadline":true,"margin_s":6.5,"duration_s":7.5,"still_writing":true,"local_committed":true}
{"type":"interval_chosen","run_id":"run-1","attempt":2,"pid":345,"time":1700000000.25,"policy":"policy-v","interval_s":2.5,"interval_steps":13,"reason":"reason-v"}
{"type":"stage_recovered","run_id":"run-1","attempt":2,"pid":345,"time":1700000000.25,"checkpoint":"checkpoint-v","step":12}
{"type":"writer_claimed","run_id":"run-1","attempt":2,"pid":345,"time":1700000000.25,"generation":11}
{"type":"storage_retry","run_id":"run-1","attempt":2,"pid":345,"time":1700000000.25,"operation":"operation-v","retry":12,"delay_s":3.5,"error":"error-v"}
{"type":"warning","run_id":"run-1","attempt":2,"pid":345,"time":1700000000.25,"message":"message-v"}
{"type":"pool_chosen","run_id":"run-1","attempt":2,"pid":345,"time":1700000000.25,"job":"job-v","pool":"pool-v","market":"market-v","price_per_hour":4.5,"reason":"reason-v","escalated":true,"excluded":["excluded-a","excluded-b"],"deadline":8.5,"spot_finish":9.5,"on_demand_finish":10.5,"on_demand_per_hour":11.5}
{"type":"no_pool_available","run_id":"run-1","attempt":2,"pid":345,"time":1700000000.25,"job":"job-v","wait_s":2.5,"reason":"reason-v"}
{"type":"excluded","run_id":"run-1","attempt":2,"pid":345,"time":1700000000.25,"job":"job-v","pool":"pool-v","machine":"machine-v","until":4.5,"score":5.5,"reason":"reason-v"}
{"type":"escalated","run_id":"run-1","attempt":2,"pid":345,"time":1700000000.25,"job":"job-v","reason":"reason-v","deadline":3.5,"spot_finish":4.5,"on_demand_finish":5.5}
{"type":"attempt_started","run_id":"run-1","attempt":2,"pid":345,"time":1700000000.25,"job":"job-v","number":12,"pool":"pool-v","market":"market-v","price_per_hour":5.5,"step_before":16,"exclude":["exclude-a","exclude-b"],"nodes":18}
{"type":"attempt_ended","run_id":"run-1","attempt":2,"pid":345,"time":1700000000.25,"job":"job-v","number":12,"pool":"pool-v","machine":"machine-v","exit_code":15,"exit_class":"exit_class-v","step_before":17,"step_after":18,"duration_s":9.5,"cost":10.5}
{"type":"retry_decided","run_id":"run-1","attempt":2,"pid":345,"time":1700000000.25,"job":"job-v","relaunch":true,"delay_s":3.5,"reason":"reason-v"}
{"type":"job_finished","run_id":"run-1","attempt":2,"pid":345,"time":1700000000.25,"job":"job-v","state":"state-v","reason":"reason-v"}
{"type":"market_interruption","run_id":"run-1","attempt":2,"pid":345,"time":1700000000.25,"number":11,"mode":"mode-v","interrupted":13,"window_s":4.5,"capacity_back_in_s":5.5,"killed":true,"nodes_taken":2,"nodes_left":1}
"""

LINES = GOLDEN.encode().splitlines(keepends=True)


def test_every_event_type_is_pinned() -> None:
    pinned = [event.event.type for event in parse_lines(LINES)]
    assert len(pinned) == len(LINES), "a pinned line no longer parses"
    assert pinned == list(ev.EVENT_TYPES)


@pytest.mark.parametrize("line", LINES, ids=[line.split(b'"')[3].decode() for line in LINES])
def test_an_event_is_written_byte_for_byte_as_before(tmp_path: Path, line: bytes) -> None:
    (logged,) = parse_lines([line])
    path = tmp_path / "events.jsonl"
    log = EventLog(path, RunIdentity(run_id=logged.run_id, attempt=logged.attempt, pid=logged.pid))
    log.emit(logged.event)
    log.close()
    assert path.read_bytes() == line


def test_supervisor_types_are_the_supervisors_events() -> None:
    assert {
        "pool_chosen",
        "no_pool_available",
        "excluded",
        "escalated",
        "attempt_started",
        "attempt_ended",
        "retry_decided",
        "job_finished",
        "market_interruption",
    } == ev.SUPERVISOR_TYPES
    assert all(issubclass(ev.EVENT_TYPES[t], ev.SupervisorEvent) for t in ev.SUPERVISOR_TYPES)
    assert not any(issubclass(c, ev.SupervisorEvent) for t, c in ev.EVENT_TYPES.items() if t not in ev.SUPERVISOR_TYPES)
