"""Process exit codes with a meaning a supervisor can act on.

=====  ==========================  ===================================================
code   name                        meaning
=====  ==========================  ===================================================
0      ``EXIT_SUCCESS``            the job finished its work
1      ``EXIT_CRASH``              an uncaught exception (Python's own code)
2      ``EXIT_USAGE``              bad command line or configuration; do not retry
65     ``EXIT_NO_USABLE_CHECKPOINT``  the run has committed checkpoints but none can be
                                   restored (all damaged): do not retry, and do not
                                   start over unless asked. 65 is ``EX_DATAERR``.
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
EXIT_NO_USABLE_CHECKPOINT = 65
EXIT_PREEMPTED = 75

__all__ = ["EXIT_CRASH", "EXIT_NO_USABLE_CHECKPOINT", "EXIT_PREEMPTED", "EXIT_SUCCESS", "EXIT_USAGE"]
