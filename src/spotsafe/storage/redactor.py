"""One command's secrets, kept out of everything it prints.

:func:`~spotsafe.storage.errors.redact` knows the secrets that look like secrets (URL user info, signed
query values, the provider's credential variables). A command line also carries secrets of its own: the user
info and query values of the URL it was given and the ``--storage-option`` values whose names say they are
credentials (``key``, ``secret``, ``token``, ...). A :class:`Redactor` remembers those for one command and
removes them, together with the usual ones, from any text before it is shown.

Created once per command by whoever runs it and passed to what prints or describes errors; never global.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from spotsafe.storage.errors import redact

MIN_SECRET_LENGTH = 4
"""Shorter values are not remembered: replacing every ``"ab"`` in a message would hide more than it protects."""

SECRET_OPTION = re.compile(r"key|secret|token|password|passwd|credential|sas|signature|connection", re.IGNORECASE)
"""A storage option whose name matches holds a secret."""


class Redactor:
    """Removes credentials from text: the usual ones plus those this command was given.

    Not thread-safe; one per command. Remembering only ever adds secrets.
    """

    def __init__(self) -> None:
        self._secrets: set[str] = set()

    def remember(self, value: object) -> None:
        """Never show ``value`` (a string of at least :data:`MIN_SECRET_LENGTH` characters; others are ignored)."""
        if isinstance(value, str) and len(value) >= MIN_SECRET_LENGTH:
            self._secrets.add(value)

    def remember_url(self, url: str) -> None:
        """Remember the user info and query values of ``url``.

        Whether the URL is acceptable at all is the library's decision (``open_storage`` refuses credentials).
        """
        if "://" not in url:
            return
        parts = urlsplit(url)
        for _, value in parse_qsl(parts.query, keep_blank_values=True):
            self.remember(value)
        userinfo = parts.netloc.rpartition("@")[0]
        if userinfo:
            user, _, password = userinfo.partition(":")
            for value in (userinfo, user, password):
                self.remember(value)

    def remember_options(self, options: Mapping[str, Any]) -> None:
        """Remember the values of storage options whose names say they are secrets, at any depth."""
        for key, value in options.items():
            if isinstance(value, Mapping):
                self.remember_options(value)
            elif SECRET_OPTION.search(str(key)):
                self.remember(value if isinstance(value, str) else json.dumps(value))

    def redact(self, text: str) -> str:
        """``text`` without credentials (longest secrets replaced first, so no part of one is left)."""
        return redact(text, tuple(sorted(self._secrets, key=len, reverse=True)))

    def reason(self, error: BaseException) -> str:
        """``error``'s message as it may be shown."""
        return self.redact(str(error))
