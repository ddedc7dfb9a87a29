"""Process exit codes with a meaning a supervisor can act on.

=====  ==========================  ===================================================
code   name                        meaning
=====  ==========================  ===================================================
0      ``EXIT_SUCCESS``            the job finished its work
1      ``EXIT_CRASH``              an uncaught exception (Python's own code)
2      ``EXIT_USAGE``              bad command line or configuration; do not retry
75     ``EXIT_PREEMPTED``          interrupted on purpose after saving (or keeping) a
                                   verified checkpoint: **resume me**. 75 is
                                   ``EX_TEMPFAIL`` from ``sysexits.h``.
=====  ==========================  ===================================================

A process killed by a signal it did not handle has no exit code of its own; a
shell reports it as 128 + the signal number (137 for SIGKILL).
"""

from __future__ import annotations

EXIT_SUCCESS = 0
EXIT_CRASH = 1
EXIT_USAGE = 2
EXIT_PREEMPTED = 75

__all__ = ["EXIT_CRASH", "EXIT_PREEMPTED", "EXIT_SUCCESS", "EXIT_USAGE"]
