"""Resumable data order and position: :class:`ResumableLoader`, or a plain DataLoader made resumable in place
with :class:`LoaderPosition`; :class:`ElasticLoader` when the number of ranks may change."""

from spotsafe.data.elastic import ElasticLoader
from spotsafe.data.loader import ResumableLoader, epoch_order
from spotsafe.data.position import LoaderPosition

__all__ = ["ElasticLoader", "LoaderPosition", "ResumableLoader", "epoch_order"]
