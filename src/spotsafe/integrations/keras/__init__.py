"""Keras 3 integration: ``SpotsafeCallback`` (torch and TensorFlow backends); see :mod:`.callback`.

Importing this module imports Keras (install it with ``pip install 'spotsafe[keras]'``); ``import spotsafe``
never does.
"""

from spotsafe.integrations.keras.callback import BACKENDS, COMPONENTS, SpotsafeCallback

__all__ = ["BACKENDS", "COMPONENTS", "SpotsafeCallback"]
