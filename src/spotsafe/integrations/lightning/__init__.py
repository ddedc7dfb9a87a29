"""Lightning: ``SpotsafeCallback``, one line in the Trainer, bit-exact resume.

    import spotsafe
    spotsafe.protect_startup()          # first lines: a stop during the slow imports is not lost
    import lightning as L
    from spotsafe.integrations.lightning import SpotsafeCallback

    trainer = L.Trainer(max_epochs=10, callbacks=[SpotsafeCallback()])
    trainer.fit(model, datamodule=data)  # run the same command again after an interruption: it resumes

Works with ``lightning`` (``lightning.pytorch``) or ``pytorch_lightning`` 2.x: the callback subclasses the
``Callback`` of the package the program imported. Importing this module imports neither; making a callback
imports the chosen one. See :mod:`spotsafe.integrations.lightning.callback` for what happens when.
"""

from spotsafe.integrations.lightning.callback import SpotsafeCallback, callback_class
from spotsafe.integrations.lightning.state import LoopState, TrainLoader

__all__ = ["LoopState", "SpotsafeCallback", "TrainLoader", "callback_class"]
