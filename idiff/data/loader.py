"""Batches cut from one global image stream, so that what step k trains on does not depend on the ranks.

Stream position p holds file ``order(epoch)[p % N]`` with ``epoch = p // N``; each epoch is a
permutation drawn from (seed, epoch) alone. Global batch k is positions [k*B, (k+1)*B) counted from
where the loader started; rank r of W reads the slice [r*b, (r+1)*b) of it, b = B // W. Resuming
needs only the position of the next batch, which ``state_dict`` holds.
"""

import logging
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from ..ranks.signals import held_from_new_processes, worker_leaves_preemption_to_parent
from ..rng import Stream, derive_seed
from .packed import PackedDataset, open_images
from .reader import DataError, Example, ImageDataset, warn_upscaled

log = logging.getLogger(__name__)


class Batch(NamedTuple):
    images: torch.Tensor  # float32 [b, 3, H, W] in [-1, 1], on the loader's device
    labels: torch.Tensor | None  # int64 [b] on the device, None without classes
    positions: torch.Tensor  # int64 [b], CPU: global stream positions
    indices: torch.Tensor  # int64 [b], CPU: into dataset.files
    upscaled: torch.Tensor  # bool [b], CPU: the file was smaller than the target size


def epoch_order(seed: int, epoch: int, num_files: int) -> np.ndarray:
    """File indices in the order epoch ``epoch`` visits them."""
    return np.random.default_rng(derive_seed(seed, Stream.DATA_ORDER, epoch)).permutation(num_files)


class StreamSampler:
    """A batch sampler: from position ``start`` on, this rank's slice of each global batch.

    Yields lists of (stream position, file index); it runs in the main process, so the workers
    never need the epoch order.
    """

    def __init__(self, num_files: int, global_batch: int, rank: int, world_size: int, seed: int,
                 shuffle: bool = True):
        self.num_files, self.global_batch, self.seed, self.shuffle = num_files, global_batch, seed, shuffle
        self.rank_batch = global_batch // world_size
        self.rank_offset = rank * self.rank_batch
        self.start = 0
        self._epoch, self._order = None, None

    def __iter__(self):
        first = self.start + self.rank_offset
        while True:
            yield [(position, self.file_index(position)) for position in range(first, first + self.rank_batch)]
            first += self.global_batch

    def file_index(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_files)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = epoch_order(self.seed, epoch, self.num_files) if self.shuffle else np.arange(self.num_files)
        return int(self._order[offset])


class StreamReader(torch.utils.data.Dataset):
    """What a worker runs: (position, file index) -> Example, or the DataError to re-raise in the main process.

    Returning the error instead of raising it keeps its message whole: the DataLoader would wrap a
    raised one into a traceback text.
    """

    def __init__(self, dataset: ImageDataset | PackedDataset):
        self.dataset = dataset

    def __getitem__(self, item: tuple[int, int]) -> Example | DataError:
        position, index = item
        try:
            return self.dataset.read(index, position)
        except DataError as e:
            return e


def collate(examples: list[Example | DataError]) -> Batch | DataError:
    errors = [e for e in examples if isinstance(e, DataError)]
    if errors:
        return errors[0]
    has_labels = examples[0].label >= 0
    return Batch(
        images=torch.from_numpy(np.stack([e.image for e in examples])),
        labels=torch.tensor([e.label for e in examples], dtype=torch.int64) if has_labels else None,
        positions=torch.tensor([e.position for e in examples], dtype=torch.int64),
        indices=torch.tensor([e.index for e in examples], dtype=torch.int64),
        upscaled=torch.tensor([e.upscaled for e in examples], dtype=torch.bool),
    )


class ShardedLoader:
    """Endless batches of this rank's share of the global stream, on ``device``; resumable."""

    def __init__(self, dataset: ImageDataset | PackedDataset, global_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, num_workers: int = 0, device="cpu", shuffle: bool = True,
                 prefetch_factor: int = 2):
        assert global_batch % world_size == 0, f"global batch {global_batch} does not split over {world_size} ranks"
        assert 0 <= rank < world_size, f"rank {rank} outside world size {world_size}"
        self.dataset, self.global_batch, self.rank, self.seed = dataset, global_batch, rank, seed
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.device = torch.device(device)
        self.sampler = StreamSampler(len(dataset), global_batch, rank, world_size, seed, shuffle)
        self.position = 0  # of the next global batch that __next__ hands out
        self.num_upscaled = 0  # counted here only when the dataset did not scan the files
        self._images_read = 0
        self._batches = None

    def state_dict(self) -> dict:
        """Plain values only: the state travels in checkpoints read with weights_only=True."""
        return {"position": self.position, "num_files": len(self.dataset),
                "fingerprint": self.dataset.fingerprint, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the saved position; the files and the seed must be those the state was saved with.

        A changed file list is an error, not a warning: the same position would then name other
        images, and the resumed run would silently differ from an uninterrupted one.
        """
        if self._batches is not None:
            raise RuntimeError("load_state_dict must come before iterating the loader")
        if state["fingerprint"] != self.dataset.fingerprint or state["num_files"] != len(self.dataset):
            raise DataError(
                f"the images under {self.dataset.data_dir} changed since the checkpoint ({state['num_files']} "
                f"files then, {len(self.dataset)} now, or other names): restore them, or start a new run "
                f"from the checkpoint with resume_checkpoint")
        if state["seed"] != self.seed:
            raise DataError(f"the data seed changed since the checkpoint ({state['seed']} then, {self.seed} now)")
        self.position = int(state["position"])

    def __iter__(self):
        if self._batches is None:
            self.sampler.start = self.position
            with held_from_new_processes():  # the workers start here
                self._batches = iter(self._data_loader())
        return self

    def __next__(self) -> Batch:
        iter(self)
        batch = next(self._batches)
        if isinstance(batch, DataError):
            raise batch
        assert int(batch.positions[0]) == self.position + self.sampler.rank_offset, "batches out of order"
        self.position += self.global_batch
        self._count_upscaled(batch)
        labels = batch.labels.to(self.device, non_blocking=True) if batch.labels is not None else None
        return batch._replace(images=batch.images.to(self.device, non_blocking=True), labels=labels)

    def close(self) -> None:
        """Stop the worker processes now instead of when the loader is garbage collected."""
        self._batches = None

    def _data_loader(self) -> torch.utils.data.DataLoader:
        workers = self.num_workers
        return torch.utils.data.DataLoader(
            StreamReader(self.dataset), batch_sampler=self.sampler, collate_fn=collate, num_workers=workers,
            pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
            prefetch_factor=self.prefetch_factor if workers else None,
            worker_init_fn=worker_leaves_preemption_to_parent,
            # Workers draw nothing at random; an own generator only keeps the global torch RNG
            # untouched, which bit-exact resume needs.
            generator=torch.Generator().manual_seed(self.seed))

    def _count_upscaled(self, batch: Batch) -> None:
        """Warn at the first small image, and once with the count after a stream's worth of files."""
        if self.dataset.num_upscaled is not None or self._images_read >= len(self.dataset):
            return
        upscaled = batch.indices[batch.upscaled].tolist()
        if upscaled and not self.num_upscaled:
            log.warning("%s is smaller than %d px: upscaled (bicubic) as the original does; rank %d counts "
                        "such images", self.dataset.files[upscaled[0]], self.dataset.image_size, self.rank)
        self.num_upscaled += len(upscaled)
        self._images_read += len(batch.indices)
        if self._images_read >= len(self.dataset):
            warn_upscaled(self.num_upscaled, self._images_read, self.dataset.image_size, f"rank {self.rank} read")


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def load_data(*, data_dir, batch_size, image_size, class_cond=False, deterministic=False):
    """The original's generator for old scripts: endless ``(images, {"y": labels})``, ``batch_size`` per rank.

    ``deterministic`` reads the files in order instead of shuffled; ranks come from torch.distributed.
    """
    rank, world_size = _rank_and_world()
    dataset = open_images(data_dir, image_size, class_cond=class_cond)
    loader = ShardedLoader(dataset, global_batch=batch_size * world_size, rank=rank, world_size=world_size,
                           num_workers=1, shuffle=not deterministic)
    for batch in loader:
        yield batch.images, ({"y": batch.labels} if class_cond else {})
