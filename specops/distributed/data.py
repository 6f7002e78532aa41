"""Data sharding: this rank's contiguous part of a sequence, a dataset or a torch ``DataLoader``."""

from __future__ import annotations

import sys
from typing import Any

from specops.distributed.launch import as_comm


def shard_range(n: int, comm: Any = None) -> range:
    """The indices ``range(lo, hi)`` of ``n`` items that this rank owns.

    Contiguous blocks in rank order whose sizes differ by at most one; every index
    belongs to exactly one rank, and the split depends only on ``n`` and the number of
    ranks.

    Args:
        n: the number of items.
        comm: ``None`` or a communicator.

    Returns:
        This rank's indices.
    """
    comm = as_comm(comm)
    return range(comm.rank * n // comm.size, (comm.rank + 1) * n // comm.size)


def shard(items: Any, comm: Any = None) -> Any:
    """The contiguous part of ``items`` that this rank owns (see :func:`shard_range`).

    Args:
        items: a sequence that slices (a list of batches, a NumPy array, a tensor), a
            map-style dataset with ``__len__`` and ``__getitem__`` (a torch ``Dataset``
            becomes a ``torch.utils.data.Subset``), or a torch ``DataLoader`` without
            shuffling: a new loader with the same settings over this rank's share of the
            *samples*. Sharding samples rather than batches keeps every rank's work equal;
            any split gives the same Hessian, as batches are weighted by sample count.
            A loader with a ``DistributedSampler`` (as in DDP training) is split already:
            the new loader takes the sampler's samples for this rank, less the repeated
            samples it pads with.
        comm: ``None`` or a communicator.

    Returns:
        This rank's part, of the kind of ``items`` (a slice, a ``Subset``, a ``DataLoader``;
        a list for a sequence that does not slice).

    Raises:
        ValueError: a shuffling or batch-sampler ``DataLoader`` (its shards would not be
            fixed, or not split by sample), or one whose ``DistributedSampler`` is for
            another rank or number of ranks.
        TypeError: ``items`` has no length (an iterator or generator).
    """
    comm = as_comm(comm)
    torch_data = getattr(sys.modules.get("torch"), "utils", None)
    torch_data = getattr(torch_data, "data", None)
    if torch_data is not None and isinstance(items, torch_data.DataLoader):
        return _shard_loader(items, comm, torch_data)
    if not hasattr(items, "__len__"):
        raise TypeError(
            f"shard needs items with a length (a list, an array, a dataset), got {type(items).__name__}; "
            "for a generator, build the list first"
        )
    part = shard_range(len(items), comm)
    if torch_data is not None and isinstance(items, torch_data.Dataset):
        return torch_data.Subset(items, list(part))
    try:
        return items[part.start:part.stop]
    except (TypeError, KeyError):
        return [items[i] for i in part]


def _shard_loader(loader, comm, torch_data):
    sampler = loader.sampler
    if loader.batch_size is None:
        raise ValueError(
            "shard() splits a DataLoader by sample and needs one with a plain batch_size (not a batch_sampler); "
            "build DataLoader(shard(dataset, comm), batch_size=..., shuffle=False) yourself instead"
        )
    if hasattr(sampler, "num_replicas") and hasattr(sampler, "rank"):  # DistributedSampler: already split
        dataset = _distributed_sampler_subset(loader, sampler, comm, torch_data)
    elif isinstance(sampler, torch_data.SequentialSampler):
        dataset = shard(loader.dataset, comm)
    else:
        raise ValueError(
            "shard() splits a DataLoader by sample and needs one with no shuffling and no custom sampler "
            "(the Hessian is multiplied many times over the same data), or one with a DistributedSampler; "
            "build DataLoader(shard(dataset, comm), batch_size=..., shuffle=False) yourself instead"
        )
    return torch_data.DataLoader(
        dataset, batch_size=loader.batch_size, shuffle=False,
        num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
        drop_last=loader.drop_last, timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
        persistent_workers=loader.persistent_workers,
    )


def _distributed_sampler_subset(loader, sampler, comm, torch_data):
    """This rank's samples of a ``DistributedSampler``, in its order, without its padding.

    A ``DistributedSampler`` (``drop_last=False``) repeats the first samples so that every
    rank gets as many: a Hessian over them would count those twice. Its order (shuffled
    or not) is fixed by its seed and epoch, so the subset is the same in every pass.
    """
    if (int(sampler.num_replicas), int(sampler.rank)) != (comm.size, comm.rank):
        raise ValueError(
            f"the loader's DistributedSampler is for rank {sampler.rank} of {sampler.num_replicas}, but this "
            f"process is rank {comm.rank} of {comm.size}; build it with num_replicas=comm.size, rank=comm.rank "
            "(its defaults under an initialized torch.distributed)"
        )
    n = len(loader.dataset)
    indices = [i for j, i in enumerate(sampler) if sampler.rank + j * sampler.num_replicas < n]
    return torch_data.Subset(loader.dataset, indices)

