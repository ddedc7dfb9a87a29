"""spotsafe: training jobs that survive spot and preemptible instances.

Typical use in a plain PyTorch loop::

    import spotsafe
    loader = spotsafe.ResumableLoader(dataset, batch_size=32, shuffle=True, num_workers=2)
    ckpt = spotsafe.Checkpointer("runs/lm", model=model, optimizer=opt, scheduler=sched, loader=loader)
    ckpt.restore()
    ...
    ckpt.step_done()   # after each optimizer step
"""

from spotsafe.data.loader import ResumableLoader
from spotsafe.engine.checkpointer import Checkpointer
from spotsafe.engine.components import Stateful
from spotsafe.engine.config import NoticeConfig, SaveConfig, StorageConfig
from spotsafe.errors import (
    CheckpointMismatchError,
    ConfigError,
    CorruptCheckpointError,
    NoUsableCheckpointError,
    SpotsafeError,
    UnsafeCheckpointError,
)
from spotsafe.exit_codes import EXIT_NO_USABLE_CHECKPOINT, EXIT_PREEMPTED, EXIT_SUCCESS
from spotsafe.policy.adaptive import max_loss, on_notice, young_daly
from spotsafe.policy.interval import every
from spotsafe.version import __version__

__all__ = [
    "EXIT_NO_USABLE_CHECKPOINT",
    "EXIT_PREEMPTED",
    "EXIT_SUCCESS",
    "CheckpointMismatchError",
    "Checkpointer",
    "ConfigError",
    "CorruptCheckpointError",
    "NoUsableCheckpointError",
    "NoticeConfig",
    "ResumableLoader",
    "SaveConfig",
    "SpotsafeError",
    "Stateful",
    "StorageConfig",
    "UnsafeCheckpointError",
    "__version__",
    "every",
    "max_loss",
    "on_notice",
    "young_daly",
]
