"""Azure Scheduled Events: ``Preempt`` and ``Terminate`` events with ``NotBefore``.

Polls ``GET /metadata/scheduledevents?api-version=2020-07-01`` with ``Metadata: true``
(without it the service answers ``400``) about once a second. The first call may take
up to two minutes while the service starts for the VM; the read timeout allows for it
and training does not wait (the watcher runs on its own thread).

* ``Preempt`` / ``Terminate`` (``stop_types``) for this VM: a ``stop`` notice, deadline
  ``NotBefore`` (RFC 1123), or now when the event has ``Started`` (``NotBefore`` is empty);
* ``Reboot`` / ``Redeploy`` (``warn_types``): a ``warning`` (take a checkpoint, keep going);
* ``Freeze`` and anything else: ignored.

Events name the VMs they affect in ``Resources``; the VM's own name is read once from
``/metadata/instance/compute/name`` (when that fails, every event counts). With
``acknowledge=True``, once the emergency checkpoint is durable the watcher approves the
events with ``POST {"StartRequests": [{"EventId": ...}]}`` so that Azure may proceed at once.
The endpoint is ``$SPOTSAFE_AZURE_METADATA_ENDPOINT`` or ``http://169.254.169.254``.
"""

from __future__ import annotations

import email.utils
import json
import os
import re
import time
from collections.abc import Callable, Mapping

from spotsafe.checks import check_bool, check_mapping, check_number, check_str, check_strings
from spotsafe.notices.base import STOP, WARNING, Notice
from spotsafe.notices.watcher import BadResponse, EndpointDown, MetadataClient, Watcher

DEFAULT_ENDPOINT = "http://169.254.169.254"
ENV_ENDPOINT = "SPOTSAFE_AZURE_METADATA_ENDPOINT"
EVENTS_PATH = "/metadata/scheduledevents?api-version=2020-07-01"
NAME_PATH = "/metadata/instance/compute/name?api-version=2021-02-01&format=text"
HEADERS = {"Metadata": "true"}
VM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}")
NAME_TRIES = 5


def parse_not_before(value: object) -> float:
    """``Mon, 19 Sep 2016 18:29:47 GMT`` -> Unix time."""
    if not isinstance(value, str):
        raise BadResponse(f"NotBefore is not a string: {value!r:.80}")
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError) as err:
        raise BadResponse(f"NotBefore is not an RFC 1123 date: {value[:80]!r}") from err


class AzureScheduledEvents(Watcher):
    """Posts notices for this VM's scheduled events; optionally acknowledges them."""

    name = "azure"

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        poll_s: float = 1.0,
        acknowledge: bool = False,
        stop_types: tuple[str, ...] = ("Preempt", "Terminate"),
        warn_types: tuple[str, ...] = ("Reboot", "Redeploy"),
        vm_name: str | None = None,
        timeout_s: float = 2.0,
        first_call_timeout_s: float = 130.0,
        clock: Callable[[], float] = time.time,
        env: Mapping[str, str] | None = None,
    ) -> None:
        check_str("endpoint", endpoint, allow_none=True)
        check_bool("acknowledge", acknowledge)
        stop_types = check_strings("stop_types", stop_types, non_empty=False)
        warn_types = check_strings("warn_types", warn_types, non_empty=False)
        check_str("vm_name", vm_name, allow_none=True)
        check_number("timeout_s", timeout_s, above=0, unit="seconds")
        check_number("first_call_timeout_s", first_call_timeout_s, above=0, unit="seconds")
        check_mapping("env", env, allow_none=True)
        super().__init__(poll_s=poll_s, clock=clock)
        env = os.environ if env is None else env
        self.endpoint = (endpoint or env.get(ENV_ENDPOINT) or DEFAULT_ENDPOINT).rstrip("/")
        self.acknowledge = acknowledge
        self.stop_types = stop_types
        self.warn_types = warn_types
        self.vm_name = vm_name
        self.first_call_timeout_s = first_call_timeout_s
        self.client = MetadataClient(self.endpoint, connect_timeout_s=timeout_s, read_timeout_s=timeout_s)
        self._answered = False
        self._name_tries = 0 if vm_name is None else NAME_TRIES
        self._to_ack: list[str] = []
        self.incarnation: int | None = None

    def describe(self) -> str:
        return f"{self.endpoint}{EVENTS_PATH} every {self.poll_s:g} s"

    def poll(self) -> float | None:
        if self._name_tries < NAME_TRIES:
            self._learn_name()
        received = self.now()
        timeout = None if self._answered else self.first_call_timeout_s
        reply = self.client.request("GET", EVENTS_PATH, headers=HEADERS, read_timeout_s=timeout)
        if reply.status != 200:
            raise BadResponse(f"GET {EVENTS_PATH} answered {reply.status} {reply.text[:80]!r}")
        self._answered = True
        try:
            document = json.loads(reply.body)
        except ValueError as err:
            raise BadResponse(f"scheduled events: not JSON: {reply.text[:80]!r}") from err
        events = document.get("Events") if isinstance(document, dict) else None
        if not isinstance(events, list) or not isinstance(document.get("DocumentIncarnation"), int):
            raise BadResponse(f"scheduled events: no DocumentIncarnation/Events in {reply.text[:120]!r}")
        self.incarnation = document["DocumentIncarnation"]
        for event in events:
            self._consider(event, received)
        return None

    def _learn_name(self) -> None:
        """This VM's name, to tell its events from its neighbours'. Until a valid one is read (a few
        tries), every event counts: a missed preemption costs more than a neighbour's early save."""
        self._name_tries += 1
        reply = self.client.request("GET", NAME_PATH, headers=HEADERS)
        name = reply.text.strip()
        if reply.status == 200 and VM_NAME.fullmatch(name):
            self.vm_name = name
            self._name_tries = NAME_TRIES

    def _consider(self, event: object, received: float) -> None:
        if not isinstance(event, dict) or not isinstance(event.get("EventId"), str):
            raise BadResponse(f"scheduled event without an EventId: {str(event)[:120]!r}")
        kind = event.get("EventType")
        if kind not in self.stop_types and kind not in self.warn_types:
            return
        resources = event.get("Resources")
        if self.vm_name is not None and isinstance(resources, list) and self.vm_name not in resources:
            return
        event_id = event["EventId"]
        not_before = event.get("NotBefore")
        if kind in self.stop_types:
            deadline = parse_not_before(not_before) if not_before not in (None, "") else received
            if event_id not in self._to_ack:
                self._to_ack.append(event_id)
            detail = f"{kind} {event_id} ({event.get('EventStatus', '?')})"
            self._post(Notice("azure", received, deadline, STOP, detail, key=f"azure:{event_id}"))
        else:
            self._post(Notice("azure", received, None, WARNING, f"{kind} {event_id}", key=f"azure:{event_id}"))

    def after_stop(self, committed: bool) -> None:
        """Approve this VM's stop events (only with ``acknowledge=True`` and a durable checkpoint)."""
        if not (self.acknowledge and committed and self._to_ack):
            return
        body = json.dumps({"StartRequests": [{"EventId": event_id} for event_id in self._to_ack]}).encode()
        try:
            reply = self.client.request(
                "POST", EVENTS_PATH, headers={**HEADERS, "Content-Type": "application/json"}, body=body
            )
        except EndpointDown as err:
            self._report("ack_failed", str(err))
            return
        if reply.status == 200:
            self._report("acknowledged", f"StartRequests for {', '.join(self._to_ack)}")
            self._to_ack = []
        else:
            self._report("ack_failed", f"POST {EVENTS_PATH} answered {reply.status} {reply.text[:80]!r}")

    def stop(self) -> None:
        super().stop()
        self.client.close()
