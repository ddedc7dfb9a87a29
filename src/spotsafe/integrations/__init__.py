"""Framework integrations: one callback each, bit-exact and non-invasive.

* :mod:`spotsafe.integrations.lightning`: ``SpotsafeCallback`` for Lightning (``lightning`` or
  ``pytorch_lightning`` 2.x);
* :mod:`spotsafe.integrations.transformers`: ``SpotsafeCallback``, a ``TrainerCallback`` for the Hugging Face Trainer;
* :mod:`spotsafe.integrations.keras`: ``SpotsafeCallback`` for Keras 3 (torch and TensorFlow backends).

Each module imports its framework; install it with the matching extra (``spotsafe[lightning]``,
``spotsafe[transformers]``, ``spotsafe[keras]``).
"""


def missing_extra(package: str, extra: str, err: ImportError) -> ImportError:
    """The error for an integration whose framework is not installed: what to install, and why it failed."""
    return ImportError(f"spotsafe.integrations.{extra} needs {package}: pip install 'spotsafe[{extra}]' ({err})")
