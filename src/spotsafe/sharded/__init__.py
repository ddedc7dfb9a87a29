"""One checkpoint for all ranks of a distributed job, through torch.distributed.checkpoint.

See :mod:`spotsafe.sharded.api` for the layout and the rules; :func:`save` and :func:`load` are collective.
"""

from spotsafe.sharded.api import LAYOUT, Restored, SaveInFlight, is_sharded, load, save, world_size_of

__all__ = ["LAYOUT", "Restored", "SaveInFlight", "is_sharded", "load", "save", "world_size_of"]
