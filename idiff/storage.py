"""Files on local disks or blob stores (gs://, az://) through blobfile, written atomically."""

import hashlib
import io
import os
import uuid

import blobfile as bf
import torch


def is_remote(path) -> bool:
    return "://" in str(path)


def join(*parts) -> str:
    return bf.join(*[str(p) for p in parts])


exists = bf.exists
isdir = bf.isdir
listdir = bf.listdir
read_bytes = bf.read_bytes
read_text = bf.read_text


def makedirs(path) -> None:
    bf.makedirs(str(path))


def remove(path) -> None:
    if bf.exists(path):
        bf.remove(path)


def atomic_write_bytes(path, data: bytes) -> dict:
    """Write ``data`` so that ``path`` holds either nothing new or all of it; returns size and sha256.

    Local: a temporary name in the same folder, fsync, rename, fsync the folder. Blob stores commit
    an object only when its upload finishes, which is already atomic.
    """
    path = str(path)
    if is_remote(path):
        bf.write_bytes(path, data)
    else:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def atomic_write_text(path, text: str) -> dict:
    return atomic_write_bytes(path, text.encode())


def append_text(path, text: str) -> None:
    """Append to a log file; blob stores cannot append, so there the (small) file is rewritten."""
    if is_remote(path):
        previous = bf.read_text(path) if bf.exists(path) else ""
        bf.write_text(path, previous + text)
    else:
        with open(path, "a") as f:
            f.write(text)


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def load_torch(path, map_location="cpu"):
    """Load a torch file as untrusted input: tensors and plain containers only."""
    with bf.BlobFile(str(path), "rb") as f:
        return torch.load(f, map_location=map_location, weights_only=True)


def file_digest(path) -> dict:
    sha, size = hashlib.sha256(), 0
    with bf.BlobFile(str(path), "rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": sha.hexdigest()}
