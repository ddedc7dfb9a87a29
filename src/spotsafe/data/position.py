"""Make an existing ``torch.utils.data.DataLoader`` resumable in place, keeping the order it would have had.

:class:`LoaderPosition` records each epoch's batch order as the loader's own sampler draws it, counts the
batches consumed, and after :meth:`~LoaderPosition.load_state_dict` the loader's next iteration serves the rest
of the saved epoch at the index level: the sampler is not asked again, no consumed sample is loaded.

What :meth:`~LoaderPosition.attach` changes, and nothing else: the loader's class becomes a spotsafe subclass
of its own class (``loader.__class__``; made once per class; :meth:`~LoaderPosition.detach` puts the original
back; copies and pickles are of the original class). DataLoader forbids setting ``sampler`` or ``batch_sampler``
after construction, so the subclass overrides two private hooks its iterators use: ``_index_sampler`` (the
batch sampler, or the sampler with ``batch_size=None``, that each iterator draws indices from) returns a
recording wrapper around the original, and ``_get_iterator`` (which creates an epoch's iterator) replays the
workers' base seed on resume and, with ``count="yield"``, counts the batches the iterator yields.
``loader.sampler``, ``loader.batch_sampler``, ``loader.generator``, ``len(loader)`` and ``isinstance`` are as before.

Why the order and every random stream stay the same:

1. A fresh epoch asks the original (batch) sampler for the whole epoch when the DataLoader asks for its first
   batch, the moment the sampler would have drawn anyway (RandomSampler's seed, DistributedSampler's
   ``seed + epoch`` permutation), keeps it as an int64 tensor (indices plus run-length batch sizes), and
   serves the same batches.
2. Creating an iterator draws the workers' base seed from ``loader.generator`` or the global torch RNG. The
   generator's state just before that draw is kept; an iterator created on resume draws from a temporary
   copy of it, so the workers get the seed they had and the global RNG (restored by the checkpoint) is not
   touched. With ``persistent_workers`` an uninterrupted run creates the iterator once, so a resume at any
   later epoch replays that first seed too.
3. ``loader.generator`` and the samplers' own ``generator`` are saved and restored with the position.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any, ClassVar

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler
from torch.utils.data.dataloader import _BaseDataLoaderIter

from spotsafe.checks import check_choice, check_int, given
from spotsafe.data.order import FORMAT, EpochOrder, SavedPosition, generators_at, set_generator_states
from spotsafe.errors import CheckpointMismatchError, ConfigError, StateError

_ATTR = "_spotsafe_position"
COUNTS = ("yield", "manual")


class _Recorder(Sampler[Any]):
    """What a positioned loader's iterators draw indices from: the original index sampler, recorded."""

    def __init__(self, position: LoaderPosition, loader: DataLoader[Any], inner: Any) -> None:
        self.position, self.loader, self.inner = position, loader, inner

    def __iter__(self) -> Iterator[Any]:
        return self.position._begin(self.loader, self.inner)

    def __len__(self) -> int:
        return len(self.inner)


class _Positioned(DataLoader[Any]):
    """The hooks a positioned loader's class adds (see the module docstring); inert once detached."""

    _spotsafe_base: ClassVar[type[DataLoader[Any]]]

    @property
    def _index_sampler(self) -> Any:
        inner = super()._index_sampler
        position = self.__dict__.get(_ATTR)
        return inner if position is None else _Recorder(position, self, inner)

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        """Pickled and copied as the loader's own class, without the position: a copy is a plain loader."""
        return _rebuild, (type(self)._spotsafe_base, {k: v for k, v in self.__dict__.items() if k != _ATTR})

    def _get_iterator(self) -> _BaseDataLoaderIter:
        position = LoaderPosition.of(self)
        if position is None:
            return super()._get_iterator()
        return position._new_iterator(self, super()._get_iterator)


def _rebuild(cls: type[DataLoader[Any]], state: dict[str, Any]) -> DataLoader[Any]:
    loader = cls.__new__(cls)
    loader.__dict__.update(state)
    return loader


class _Counting(_BaseDataLoaderIter):
    """Added to a positioned loader's iterator class with ``count="yield"``: counts each batch it yields."""

    def __next__(self) -> Any:
        batch = super().__next__()
        owner = self.__dict__.get(_ATTR)
        if owner is not None:
            owner[0]._yielded(owner[1])
        return batch


_SUBCLASSES: dict[tuple[type, type], type] = {}


def _subclass(base: type, mixin: type) -> type:
    if issubclass(base, mixin):
        return base
    key = (base, mixin)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(base.__name__, (mixin, base), {"_spotsafe_base": base})
    return _SUBCLASSES[key]


def _generators(loader: DataLoader[Any]) -> dict[str, torch.Generator]:
    """The loader's own random generators, by where they are found."""
    batches, inner = loader.batch_sampler, getattr(loader.batch_sampler, "sampler", None)
    places = {"loader": loader, "sampler": loader.sampler, "batch_sampler": batches, "batch_sampler.sampler": inner}
    return generators_at({name: getattr(obj, "generator", None) for name, obj in places.items()})


def underlying(loader: Any) -> Any:
    """The DataLoader that ``loader`` iterates: itself, or what a wrapper that only claims to be a DataLoader
    (accelerate's ``DataLoaderShard``, whose ``__class__`` is its ``base_dataloader``'s) wraps."""
    while isinstance(loader, DataLoader) and not issubclass(type(loader), DataLoader):
        inner = getattr(loader, "base_dataloader", None)
        if inner is None or inner is loader:
            break
        loader = inner
    return loader


def check_attachable(loader: object, name: str = "loader") -> Any:
    """Raise :class:`~spotsafe.errors.ConfigError` unless a LoaderPosition can record ``loader``; return its
    original index sampler."""
    loader = underlying(loader)
    if not isinstance(loader, DataLoader) or not issubclass(type(loader), DataLoader):
        raise ConfigError(f"{name} must be a torch.utils.data.DataLoader, got {given(loader)}")
    if isinstance(loader.dataset, IterableDataset):
        raise ConfigError(
            f"{name}: spotsafe records a DataLoader's sampler indices, and one over an IterableDataset has none; "
            "give the dataset state_dict()/load_state_dict() and pass it to the Checkpointer as an extra"
        )
    if getattr(loader, "in_order", True) is False:
        raise ConfigError(f"{name}: in_order=False yields batches out of order, so no position can name them")
    inner = DataLoader._index_sampler.fget(loader)  # type: ignore[attr-defined]
    try:
        len(inner)
    except TypeError:
        raise ConfigError(
            f"{name}: spotsafe records each epoch's order, so the DataLoader's sampler must be finite with len(); "
            f"{given(inner)} has no len()"
        ) from None
    return inner


def needs_position(loader: object, name: str = "loader") -> bool:
    """Whether ``loader`` is a plain DataLoader (no ``state_dict()`` of its own) that spotsafe makes resumable in
    place; raises :class:`~spotsafe.errors.ConfigError` for one it cannot record, or one that a wrapper fetches
    ahead of the loop (then its batches cannot be counted as they are yielded). No side effects."""
    if not isinstance(loader, DataLoader):
        return False
    if underlying(loader) is not loader:
        raise ConfigError(
            f"{name}: {given(loader)} wraps a DataLoader and fetches ahead of your loop (accelerate's prepared "
            f"loaders do), so spotsafe cannot count the batches you consumed: pass {name}="
            "spotsafe.data.LoaderPosition(loader, count='manual') and call its consumed() after each batch"
        )
    if callable(getattr(loader, "state_dict", None)):
        return False
    check_attachable(loader, name)
    return True


class LoaderPosition:
    """Makes a torch DataLoader resumable in place, keeping the order it would have had.

    ``count="yield"``: a batch counts as consumed when the loader's iterator yields it (plain loops).
    ``count="manual"``: the caller says how many were consumed with :meth:`consumed` (frameworks that fetch
    ahead). Pass it to :class:`~spotsafe.Checkpointer` as ``loader=`` (a plain DataLoader given as ``loader=``
    gets one with ``count="yield"``), or save its :meth:`state_dict` yourself.

    Contract: the loader is iterated by one thread at a time (the training loop's), one iteration at a time;
    each ``iter(loader)`` begins a new epoch, as with a plain DataLoader. Call :meth:`load_state_dict` before the
    iteration that should resume. The sampler must be finite, have ``len()``, yield integer indices, and draw
    its randomness when its iteration starts (every torch sampler does).
    """

    def __init__(self, loader: DataLoader[Any] | None = None, *, count: str = "yield") -> None:
        check_choice("count", count, COUNTS)
        self.count = count
        self._loader: DataLoader[Any] | None = None
        self._batched: bool | None = None
        self._epoch = 0
        self._started = False  # whether epoch self._epoch has begun
        self._position = 0
        self._order: EpochOrder | None = None  # the current epoch's order, once drawn
        self._token = 0  # which iteration is the current one
        self._seed_state: torch.Tensor | None = None  # base-seed generator state when the live iterator was made
        self._persistent = False  # that iterator has persistent workers: an uninterrupted run reuses it
        self._resume_next = False  # the next iteration continues the restored epoch
        self._awaiting = False  # an iterator was made whose epoch has not drawn its first index yet
        self._replay = False  # the next iterator created replays self._seed_state
        self._pending_generators: dict[str, torch.Tensor] | None = None
        if loader is not None:
            self.attach(loader)

    @staticmethod
    def of(loader: object) -> LoaderPosition | None:
        """The position attached to ``loader``, if any."""
        found = getattr(underlying(loader), "__dict__", {}).get(_ATTR)
        return found if isinstance(found, LoaderPosition) else None

    @property
    def loader(self) -> DataLoader[Any] | None:
        return self._loader

    @property
    def epoch(self) -> int:
        """The current epoch: iterations begun - 1 (0 before the first); after a restore, the one that resumes."""
        return self._epoch

    @property
    def position(self) -> int:
        """Batches consumed in the current epoch."""
        return self._position

    def __repr__(self) -> str:
        return f"LoaderPosition(epoch={self._epoch}, position={self._position}, count={self.count!r})"

    # -- attaching ---------------------------------------------------------------------------------------------
    def attach(self, loader: DataLoader[Any]) -> None:
        """Record ``loader`` from now on; a new loader object keeps the position, the same one is a no-op.
        A wrapper such as accelerate's ``DataLoaderShard`` is recorded through the DataLoader it iterates."""
        loader = underlying(loader)
        if loader is self._loader:
            return
        inner = check_attachable(loader)
        other = LoaderPosition.of(loader)
        if other is not None:
            raise ConfigError("this DataLoader already has a LoaderPosition; use that one (LoaderPosition.of)")
        self._check_fits(loader, self._order, self._epoch)
        if self._pending_generators is not None:
            self._apply_generators(loader, self._pending_generators)
        self.detach()
        loader.__class__ = _subclass(type(loader), _Positioned)
        loader.__dict__[_ATTR] = self
        self._loader, self._batched = loader, loader.batch_sampler is not None
        live = loader.__dict__.get("_iterator")
        if live is not None:  # a persistent iterator made before: it goes on with this position
            live._index_sampler = _Recorder(self, loader, inner)
            self._watch(live, loader)
            self._persistent = True

    def detach(self) -> None:
        """Give the loader its own class back; the position state stays here (attach another loader)."""
        loader, self._loader = self._loader, None
        if loader is None:
            return
        loader.__dict__.pop(_ATTR, None)
        loader.__class__ = type(loader)._spotsafe_base  # type: ignore[attr-defined]
        live = loader.__dict__.get("_iterator")
        if live is not None:
            live.__dict__.pop(_ATTR, None)

    @staticmethod
    def _check_fits(loader: DataLoader[Any], order: EpochOrder | None, epoch: int) -> None:
        if order is None:
            return
        if (order.runs is not None) != (loader.batch_sampler is not None):
            how = "without" if order.runs is None else "with"
            raise CheckpointMismatchError(
                f"the checkpoint's data order was recorded {how} automatic batching and this DataLoader is set up "
                "the other way (batch_size=None or not): use the same loader settings"
            )
        batches = len(DataLoader._index_sampler.fget(loader))  # type: ignore[attr-defined]
        if len(order) != batches:
            raise CheckpointMismatchError(
                f"the checkpoint's epoch {epoch} has {len(order)} batches and this DataLoader makes {batches} "
                "per epoch (its dataset, batch_size, sampler or drop_last changed): resuming would feed different "
                "batches. Use the same data settings, or start a new run."
            )
        dataset = loader.dataset
        if isinstance(dataset, Sized) and len(order.indices) and int(order.indices.max()) >= len(dataset):
            raise CheckpointMismatchError(
                f"the checkpoint's data order has index {int(order.indices.max())} and the dataset has "
                f"{len(dataset)} samples: resuming would feed different batches. Use the same dataset."
            )

    # -- the loader's hooks ------------------------------------------------------------------------------------
    def _new_iterator(self, loader: DataLoader[Any], make: Any) -> _BaseDataLoaderIter:
        replay, self._replay, before = self._replay, False, self._token
        if replay:
            temporary = torch.Generator()
            if self._seed_state is not None:
                temporary.set_state(self._seed_state)
            own = loader.generator
            loader.generator = temporary  # the base seed comes from the replayed state, nothing else moves
            try:
                iterator: _BaseDataLoaderIter = make()
            finally:
                loader.generator = own
        else:
            source = loader.generator if loader.generator is not None else torch.default_generator
            self._seed_state = source.get_state()
            iterator = make()
        self._awaiting = self._token == before  # a single-process iterator draws at its first next()
        self._persistent = bool(loader.persistent_workers and loader.num_workers > 0)
        self._watch(iterator, loader)
        return iterator

    def _watch(self, iterator: _BaseDataLoaderIter, loader: DataLoader[Any]) -> None:
        if self.count == "yield":
            iterator.__class__ = _subclass(type(iterator), _Counting)
            iterator.__dict__[_ATTR] = (self, loader)

    def _begin(self, loader: DataLoader[Any], inner: Any) -> Iterator[Any]:
        """An iterator of ``loader`` asks for its indices. The epoch begins when it draws the first one: a
        multi-process iterator asks twice while it is made and uses only the second."""
        if loader is not self._loader:
            return iter(inner)  # an iterator left over from a detached loader
        return self._epoch_indices(inner)

    def _epoch_indices(self, inner: Any) -> Iterator[Any]:
        self._token += 1
        token, self._replay, self._awaiting = self._token, False, False
        if self._resume_next:
            self._resume_next = False
            if self._order is not None:
                yield from self._order.serve(self._position)
                return
        else:
            if self._started:
                self._epoch += 1
            self._started, self._position, self._order = True, 0, None
        order = EpochOrder.draw(inner, batched=bool(self._batched))
        if token == self._token:
            self._order = order
        yield from order.serve(0)

    def _yielded(self, loader: DataLoader[Any]) -> None:
        if loader is self._loader:
            self._position += 1

    # -- counting and state --------------------------------------------------------------------------------------
    def consumed(self, batches: int = 1) -> None:
        """``batches`` more batches of the current epoch were consumed (``count="manual"`` only)."""
        if self.count != "manual":
            raise ConfigError("consumed() is for LoaderPosition(count='manual'); with count='yield' it counts itself")
        check_int("batches", batches, at_least=0)
        total = len(self._order) if self._order is not None else 0
        if self._position + batches > total:
            raise StateError(
                f"consumed({batches}) at position {self._position} of epoch {self._epoch}, which has {total} "
                "batches drawn: count only batches the loader yielded in this epoch"
            )
        self._position += batches

    def state_dict(self) -> dict[str, Any]:
        """The position, the current epoch's order while it is unfinished, and the loader's generators."""
        order, epoch, position, started = self._order, self._epoch, self._position, self._started
        if self._awaiting and not self._resume_next:  # an iterator was made for the next epoch: it has begun
            epoch, position, started, order = epoch + 1 if started else epoch, 0, True, None
        elif order is not None and position >= len(order):  # finished: the next iteration starts the next epoch
            epoch, position, started, order = epoch + 1, 0, False, None
        return {
            "format": FORMAT,
            "epoch": epoch,
            "position": position,
            "started": started,
            "batched": self._batched,
            "order": None if order is None else order.state_dict(),
            "seed_state": self._seed_state,
            "persistent": self._persistent,
            "generators": self._generator_states(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the saved epoch at the saved position with the loader's next iteration."""
        saved = SavedPosition.parse(state)
        if self._loader is not None:
            self._check_fits(self._loader, saved.order, saved.epoch)
            self._apply_generators(self._loader, saved.generators)
        else:
            self._pending_generators = saved.generators
        self._epoch, self._position, self._started = saved.epoch, saved.position, saved.started
        self._order, self._seed_state, self._persistent = saved.order, saved.seed_state, saved.persistent
        self._batched = saved.batched if self._batched is None else self._batched
        self._resume_next = saved.started
        self._replay = saved.started or saved.persistent
        self._token += 1

    def _generator_states(self) -> dict[str, torch.Tensor]:
        if self._loader is None:
            return dict(self._pending_generators or {})
        return {name: g.get_state() for name, g in _generators(self._loader).items()}

    def _apply_generators(self, loader: DataLoader[Any], states: dict[str, torch.Tensor]) -> None:
        set_generator_states(_generators(loader), states)
        self._pending_generators = None
