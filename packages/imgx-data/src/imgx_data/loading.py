"""Batches for training and evaluation: grain index space, per-host loading, global arrays.

A random-access source (``len`` and ``__getitem__``, e.g. ``tfds.data_source`` or a list of
dicts) holds samples ``{"uid": str|bytes, "image": float32 (*spatial, channels),
"label": uint8 (*spatial), "spacing": float32 (ndim,), ...}`` in physical axis order.
Batches follow the shared contract::

    {"image": float32 (batch, *spatial, channels),  # jax.Array, sharded over "data"
     "label": int32 (batch, *spatial),              # jax.Array, sharded over "data"
     "valid": bool (batch,),                        # jax.Array; False marks padding
     "spacing": float32 (batch, ndim),              # jax.Array, mm per axis
     "uid": numpy str (local_batch,)}               # host-side, this process's rows

Training order is a pure function of ``(seed, step)``: grain shuffles the source with the
seed and reshuffles every epoch (``MapDataset.shuffle(seed).repeat()``), and step ``s``
reads the global positions ``[s * batch, (s + 1) * batch)`` of that infinite sequence
(skipping each epoch's remainder when ``drop_remainder``). The iterator state is therefore
just the step, and restoring it reproduces the batches exactly. Each process reads only the
rows its devices hold (``sharding.addressable_devices_indices_map``) and the global arrays are
assembled with ``jax.make_array_from_process_local_data``, so multi-host runs load every
sample once per global batch.
"""

from __future__ import annotations

import collections
import concurrent.futures
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
_STATE_VERSION = 1


class RandomAccessSource(Protocol):
    """What the loaders need from a data source: a length and integer indexing."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Mapping[str, Any]: ...


def _as_text(uid: Any) -> str:
    """Decodes a uid that TFDS returns as bytes."""
    if isinstance(uid, bytes | np.bytes_):
        return uid.decode("utf-8")
    return str(uid)


def _stack_samples(samples: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Stacks samples into host arrays of the batch contract (without ``valid``).

    Raises:
        KeyError: a sample lacks ``image``, ``label`` or ``spacing``.
        ValueError: the samples disagree in shape, or image/label/spacing do not match.
    """
    uids, images, labels, spacings = [], [], [], []
    for sample in samples:
        uid = _as_text(sample.get("uid", "?"))
        for field in ("image", "label", "spacing"):
            if field not in sample:
                raise KeyError(
                    f"Sample {uid!r} has no field {field!r}; a data source must give "
                    "'uid', 'image' (*spatial, channels), 'label' (*spatial) and 'spacing' (ndim,)."
                )
        image = np.asarray(sample["image"], dtype=np.float32)
        label = np.asarray(sample["label"])
        spacing = np.asarray(sample["spacing"], dtype=np.float32)
        if image.shape[:-1] != label.shape or spacing.shape != (label.ndim,):
            raise ValueError(
                f"Sample {uid!r}: image {image.shape} must be (*spatial, channels) with the "
                f"label's spatial shape {label.shape} and spacing {spacing.shape} must be "
                f"({label.ndim},)."
            )
        if images and image.shape != images[0].shape:
            raise ValueError(
                f"Sample {uid!r} has image shape {image.shape} but {uids[0]!r} has "
                f"{images[0].shape}; batched samples need one shape (preprocess to a fixed "
                "grid or crop patches before batching)."
            )
        uids.append(uid)
        images.append(image)
        labels.append(label.astype(np.int32))
        spacings.append(spacing)
    return {
        "uid": np.asarray(uids, dtype=np.str_),
        "image": np.stack(images),
        "label": np.stack(labels),
        "spacing": np.stack(spacings),
    }


def _data_sharding(mesh: Mesh, data_axis: str) -> NamedSharding:
    if data_axis not in mesh.axis_names:
        raise ValueError(
            f"The mesh has axes {mesh.axis_names} but batches are sharded over {data_axis!r}; "
            f"name the batch axis {data_axis!r} (e.g. jax.make_mesh((n,), ({data_axis!r},)))."
        )
    return NamedSharding(mesh, PartitionSpec(data_axis))


def _local_rows(sharding: NamedSharding | None, batch_size: int) -> range:
    """The contiguous rows of a global batch held by this process's devices."""
    if sharding is None:
        if jax.process_count() > 1:
            raise ValueError("Loading on several processes needs a mesh (mesh=None given).")
        return range(batch_size)
    data_size = sharding.mesh.shape[sharding.spec[0]]
    if batch_size % data_size:
        raise ValueError(
            f"Batch size {batch_size} is not divisible by the {data_size} devices of the mesh "
            f"axis {sharding.spec[0]!r}; choose a multiple of {data_size}."
        )
    index_map = sharding.addressable_devices_indices_map((batch_size,))
    rows = sorted({row for index in index_map.values() for row in range(batch_size)[index[0]]})
    if rows != list(range(rows[0], rows[-1] + 1)):
        raise ValueError(
            f"This process holds non-contiguous batch rows {rows}; use a mesh whose "
            "data axis gives each process a contiguous block of devices."
        )
    return range(rows[0], rows[-1] + 1)


def _to_global(
    host: dict[str, np.ndarray], sharding: NamedSharding | None, batch_size: int
) -> dict[str, Any]:
    """Places this process's rows as global arrays of ``batch_size`` rows (uid stays host)."""
    batch: dict[str, Any] = {"uid": host["uid"]}
    for field in ("image", "label", "valid", "spacing"):
        local = host[field]
        if sharding is None:
            batch[field] = jax.device_put(local)
        else:
            global_shape = (batch_size, *local.shape[1:])
            batch[field] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return batch


class _Reader:
    """Reads the samples at given positions with a thread pool, a few batches ahead.

    Batches are identified by a key; ``request`` starts reading, ``take`` waits and stacks.
    Prefetching never changes which samples a batch holds, only when they are read.
    """

    def __init__(self, dataset: Any, num_threads: int):
        self._dataset = dataset
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=num_threads, thread_name_prefix="imgx_data_reader"
        )
        self._pending: collections.OrderedDict[Any, list[concurrent.futures.Future]] = (
            collections.OrderedDict()
        )

    def request(self, key: Any, positions: Sequence[int]) -> None:
        if key not in self._pending:
            self._pending[key] = [
                self._pool.submit(self._dataset.__getitem__, int(p)) for p in positions
            ]

    def take(self, key: Any, positions: Sequence[int]) -> dict[str, np.ndarray]:
        self.request(key, positions)
        futures = self._pending.pop(key)
        return _stack_samples([future.result() for future in futures])

    def clear(self) -> None:
        for futures in self._pending.values():
            for future in futures:
                future.cancel()
        self._pending.clear()

    def close(self) -> None:
        self.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)


class TrainIterator(Iterator[dict[str, Any]]):
    """Endless, seeded, resumable training batches.

    Step ``s`` (0-based) holds the samples at positions ``[s * B, (s + 1) * B)`` of the
    grain sequence ``MapDataset.source(source).shuffle(seed).repeat()`` (a fresh permutation
    per epoch). With ``drop_remainder`` each epoch gives ``len(source) // B`` batches and its
    last ``len(source) % B`` positions are skipped, so no batch spans two epochs.

    Example::

        it = TrainIterator(source, global_batch_size=8, seed=0, mesh=mesh)
        batch = next(it)               # image (8, *spatial, C) sharded over "data"
        state = it.get_state()         # {"step": 1, ...}: save with the checkpoint
        it.set_state(state)            # later: continue with exactly the same batches

    Args:
        source: random-access samples (see the module docstring).
        global_batch_size: samples per step over all processes; divisible by the number of
            devices along the mesh's data axis.
        seed: shuffle seed; the order is a pure function of ``(seed, step)``.
        mesh: batches become global arrays sharded ``NamedSharding(mesh, P(data_axis))``;
            None places them on the default device (single process only).
        drop_remainder: skip each epoch's incomplete last batch.
        data_axis: name of the mesh axis the batch is split over.
        num_threads: threads reading samples (array_record reads release the GIL).
        prefetch: batches read ahead of the one returned.
    """

    def __init__(
        self,
        source: RandomAccessSource,
        *,
        global_batch_size: int,
        seed: int,
        mesh: Mesh | None = None,
        drop_remainder: bool = True,
        data_axis: str = DATA_AXIS,
        num_threads: int = 8,
        prefetch: int = 2,
    ):
        num_samples = len(source)
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be positive, got {global_batch_size}.")
        if num_samples == 0:
            raise ValueError("The data source is empty; check the dataset name and split.")
        if drop_remainder and num_samples < global_batch_size:
            raise ValueError(
                f"global_batch_size {global_batch_size} exceeds the {num_samples} samples of "
                "the source, so drop_remainder=True leaves no batch; lower the batch size or "
                "pass drop_remainder=False."
            )
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed = int(seed)
        self.drop_remainder = drop_remainder
        self._sharding = None if mesh is None else _data_sharding(mesh, data_axis)
        self._rows = _local_rows(self._sharding, global_batch_size)
        self._prefetch = max(0, prefetch)
        dataset = grain.MapDataset.source(source).shuffle(seed=self.seed).repeat()
        self._reader = _Reader(dataset, num_threads)
        self._step = 0

    @property
    def steps_per_epoch(self) -> int:
        """Batches per pass over the source (the last one may span two epochs if not dropped)."""
        if self.drop_remainder:
            return self.num_samples // self.global_batch_size
        return -(-self.num_samples // self.global_batch_size)

    @property
    def step(self) -> int:
        """Index of the batch the next ``next()`` returns."""
        return self._step

    def positions(self, step: int) -> range:
        """Positions in the shuffled, repeated sequence of this process's rows at ``step``."""
        batch = self.global_batch_size
        if self.drop_remainder:
            epoch, within = divmod(step, self.num_samples // batch)
            first = epoch * self.num_samples + within * batch
        else:
            first = step * batch
        return range(first + self._rows.start, first + self._rows.stop)

    def __next__(self) -> dict[str, Any]:
        step = self._step
        for ahead in range(self._prefetch + 1):  # the current batch first
            self._reader.request(step + ahead, self.positions(step + ahead))
        host = self._reader.take(step, self.positions(step))
        host["valid"] = np.ones(len(self._rows), dtype=bool)
        self._step += 1
        return _to_global(host, self._sharding, self.global_batch_size)

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position; the rest is checked on restore."""
        return {
            "version": _STATE_VERSION,
            "step": self._step,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "num_samples": self.num_samples,
            "drop_remainder": self.drop_remainder,
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continues from a state of ``get_state``; the order settings must match.

        Raises:
            ValueError: the state came from an iterator with another seed, batch size,
                source length or remainder policy, so its step would mean other batches.
        """
        expected = self.get_state()
        for field in ("version", "seed", "global_batch_size", "num_samples", "drop_remainder"):
            if state.get(field) != expected[field]:
                raise ValueError(
                    f"Iterator state field {field!r} is {state.get(field)!r} but this iterator "
                    f"has {expected[field]!r}; resume with the same data and batch settings."
                )
        step = state["step"]
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"Iterator state 'step' must be a non-negative int, got {step!r}.")
        self._reader.clear()
        self._step = step

    def close(self) -> None:
        """Stops the reader threads."""
        self._reader.close()

    def __enter__(self) -> TrainIterator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def eval_batches(
    source: RandomAccessSource,
    batch_size: int,
    mesh: Mesh | None = None,
    *,
    data_axis: str = DATA_AXIS,
    num_threads: int = 8,
    prefetch: int = 2,
) -> Iterator[dict[str, Any]]:
    """Yields every sample once, in source order, in batches of ``batch_size``.

    The last batch is filled up by repeating the last sample with ``valid = False``; drop
    those rows after the step (``uid[valid]``, ``predictions[valid]``), so every sample is
    counted exactly once.

    Args:
        source: random-access samples (see the module docstring).
        batch_size: global rows per batch; divisible by the devices of the data axis.
        mesh: as in ``TrainIterator``.
        data_axis: name of the mesh axis the batch is split over.
        num_threads: threads reading samples.
        prefetch: batches read ahead of the one yielded.
    """
    num_samples = len(source)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    sharding = None if mesh is None else _data_sharding(mesh, data_axis)
    rows = _local_rows(sharding, batch_size)
    num_batches = -(-num_samples // batch_size)

    def positions(index: int) -> list[int]:
        first = index * batch_size
        return [min(first + row, num_samples - 1) for row in rows]

    reader = _Reader(source, num_threads)
    try:
        for index in range(num_batches):
            for ahead in range(index, min(index + 1 + prefetch, num_batches)):
                reader.request(ahead, positions(ahead))
            host = reader.take(index, positions(index))
            host["valid"] = np.asarray([index * batch_size + row < num_samples for row in rows])
            yield _to_global(host, sharding, batch_size)
    finally:
        reader.close()
