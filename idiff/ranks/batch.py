"""Splitting the global batch over ranks, and the microbatch each rank runs."""

from ..errors import UserError


def per_rank_batch(global_batch: int, world_size: int, field: str = "train.batch_size") -> int:
    if global_batch % world_size:
        working = [w for w in range(1, min(global_batch, 4096) + 1) if global_batch % w == 0]
        raise UserError(
            f"{field}={global_batch} is the global batch and cannot be split evenly over {world_size} ranks; "
            f"world sizes that work: {', '.join(map(str, working))}"
        )
    return global_batch // world_size


def choose_microbatch(setting, rank_batch: int, fits=None, field: str = "train.microbatch") -> int:
    """The microbatch for ``setting`` (None, an int, or 'auto').

    'auto' tries the rank batch, then halves it until ``fits(size)`` (a forward+backward probe that
    returns False on out-of-memory) succeeds; without a probe (CPU) it is the whole rank batch.
    """
    if setting is None:
        return rank_batch
    if setting == "auto":
        size = rank_batch
        while fits is not None and size > 1 and not fits(size):
            size = (size + 1) // 2
        return size
    if setting > rank_batch:
        raise UserError(f"{field}={setting} is larger than the per-rank batch {rank_batch}")
    return setting
