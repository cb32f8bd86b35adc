"""Training images: the reader (files, labels, pixels), packed data, the sharded loader, and preparation commands."""

from .loader import Batch, ShardedLoader, epoch_order, load_data
from .packed import PackedDataset, open_images
from .reader import IMAGE_EXTENSIONS, DataError, ImageDataset, list_image_files

__all__ = ["ImageDataset", "PackedDataset", "open_images", "ShardedLoader", "Batch", "DataError", "load_data",
           "epoch_order", "list_image_files", "IMAGE_EXTENSIONS"]
