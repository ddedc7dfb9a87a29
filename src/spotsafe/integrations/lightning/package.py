"""Which Lightning: the ``lightning`` package (``lightning.pytorch``) or the standalone ``pytorch_lightning``.

Both ship the same Trainer under different names, and a callback must be an instance of the ``Callback`` class
of the package the user's Trainer comes from. Nothing here imports either package until a callback is made.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

from spotsafe.errors import ConfigError

PACKAGES = ("lightning.pytorch", "pytorch_lightning")
"""Preferred first: ``lightning`` is the current distribution; ``pytorch_lightning`` the standalone one."""
ALIASES = {
    "lightning": "lightning.pytorch",
    "lightning.pytorch": "lightning.pytorch",
    "pytorch_lightning": "pytorch_lightning",
}
INSTALL_HINT = "pip install 'spotsafe[lightning]' (or pip install lightning)"


def installed() -> list[str]:
    """The Lightning packages that can be imported here, preferred first."""
    found = []
    for name in PACKAGES:
        top = name.split(".", 1)[0]
        try:
            if importlib.util.find_spec(top) is not None:
                found.append(name)
        except (ImportError, ValueError):
            continue
    return found


def choose(package: str | None = None) -> ModuleType:
    """The Lightning package a callback made now should belong to.

    ``package`` (``"lightning"`` or ``"pytorch_lightning"``) decides when given. Otherwise the one the program has
    imported (its Trainer comes from there); when it imported both or neither, ``lightning`` if installed.
    Raises :class:`ImportError` when none is installed, or the package is not version 2.
    """
    if package is not None:
        name = ALIASES.get(package)
        if name is None:
            raise ConfigError(f"package must be 'lightning' or 'pytorch_lightning', got {package!r}")
    else:
        loaded = [n for n in PACKAGES if n in sys.modules]
        candidates = installed()
        if len(loaded) == 1:
            name = loaded[0]
        elif candidates:
            name = candidates[0]
        else:
            raise ImportError(f"spotsafe's Lightning callback needs Lightning 2.x: {INSTALL_HINT}")
    try:
        module = importlib.import_module(name)
    except ImportError as err:
        raise ImportError(f"spotsafe's Lightning callback could not import {name}: {err}. {INSTALL_HINT}") from err
    version = str(getattr(module, "__version__", "") or getattr(sys.modules.get(name.split(".")[0]), "__version__", ""))
    if not version.startswith("2."):
        raise ImportError(f"spotsafe's Lightning callback supports Lightning 2.x; {name} is version {version or '?'}")
    return module


__all__ = ["ALIASES", "INSTALL_HINT", "PACKAGES", "choose", "installed"]
