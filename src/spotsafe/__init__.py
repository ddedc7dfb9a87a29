"""spotsafe: training jobs that survive spot and preemptible instances.

Typical use in a plain PyTorch loop::

    import spotsafe
    spotsafe.protect_startup()   # first: a stop during the slow imports below is not lost
    import torch
    ...
    loader = spotsafe.ResumableLoader(dataset, batch_size=32, shuffle=True, num_workers=2)
    ckpt = spotsafe.Checkpointer("runs/lm", model=model, optimizer=opt, scheduler=sched, loader=loader)
    ckpt.restore()
    ...
    ckpt.step_done()   # after each optimizer step

``import spotsafe`` is cheap: it does not import torch. The names below that need torch
(:class:`Checkpointer`, :class:`ResumableLoader`, ...) are imported on first use (PEP 562), so
``spotsafe.protect_startup()`` can run before the framework's imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from spotsafe.errors import (
    CheckpointMismatchError,
    ConfigError,
    CorruptCheckpointError,
    NoUsableCheckpointError,
    SpotsafeError,
    UnsafeCheckpointError,
    WorldSizeMismatchError,
)
from spotsafe.exit_codes import EXIT_NO_USABLE_CHECKPOINT, EXIT_PREEMPTED, EXIT_SUCCESS
from spotsafe.startup import protect_startup
from spotsafe.version import __version__

if TYPE_CHECKING:  # what type checkers see; at run time these come from __getattr__ below
    from spotsafe.data.elastic import ElasticLoader
    from spotsafe.data.loader import ResumableLoader
    from spotsafe.data.position import LoaderPosition
    from spotsafe.engine.checkpointer import Checkpointer
    from spotsafe.engine.components import Stateful
    from spotsafe.engine.config import NoticeConfig, SaveConfig, StorageConfig
    from spotsafe.policy.adaptive import max_loss, on_notice, young_daly
    from spotsafe.policy.interval import every

_LAZY: dict[str, str] = {
    "Checkpointer": "spotsafe.engine.checkpointer",
    "ElasticLoader": "spotsafe.data.elastic",
    "LoaderPosition": "spotsafe.data.position",
    "NoticeConfig": "spotsafe.engine.config",
    "ResumableLoader": "spotsafe.data.loader",
    "SaveConfig": "spotsafe.engine.config",
    "Stateful": "spotsafe.engine.components",
    "StorageConfig": "spotsafe.engine.config",
    "every": "spotsafe.policy.interval",
    "max_loss": "spotsafe.policy.adaptive",
    "on_notice": "spotsafe.policy.adaptive",
    "young_daly": "spotsafe.policy.adaptive",
}
"""Public names imported on first use: name -> the module that defines it."""

__all__ = [
    "EXIT_NO_USABLE_CHECKPOINT",
    "EXIT_PREEMPTED",
    "EXIT_SUCCESS",
    "CheckpointMismatchError",
    "Checkpointer",
    "ConfigError",
    "CorruptCheckpointError",
    "ElasticLoader",
    "LoaderPosition",
    "NoUsableCheckpointError",
    "NoticeConfig",
    "ResumableLoader",
    "SaveConfig",
    "SpotsafeError",
    "Stateful",
    "StorageConfig",
    "UnsafeCheckpointError",
    "WorldSizeMismatchError",
    "__version__",
    "every",
    "max_loss",
    "on_notice",
    "protect_startup",
    "young_daly",
]

if not TYPE_CHECKING:  # hidden from type checkers, so that a misspelt name stays an error for them

    def __getattr__(name: str) -> Any:
        """Import a lazy public name on first use and keep it (PEP 562)."""
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module 'spotsafe' has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    """The public names (lazy ones included, imported or not) and the module's dunders."""
    return sorted(set(__all__) | {name for name in globals() if name.startswith("__")})
