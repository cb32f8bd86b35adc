"""``idiff-collect``: shards in, one .npz in index order out, bad shard sets refused by name."""

import tracemalloc
import zipfile

import numpy as np
import pytest
from conftest import idiff_in_process
from PIL import Image

from idiff.collect import collect, main
from idiff.shards import shard_name

SIZE = 8
RANGES = [(0, 5), (5, 7), (7, 16), (16, 17)]  # uneven, as a rerun with another world size leaves them


def images_for(start, end, size=SIZE):
    """Image i is filled with i's bytes, so any reordering or loss shows."""
    index = np.arange(start, end, dtype=np.uint32)[:, None, None, None]
    return ((index * 37 + np.arange(size * size * 3).reshape(1, size, size, 3)) % 251).astype(np.uint8)


def write_shard(folder, start, end, images=None, labels=True, **extra):
    arrays = {"arr_0": images_for(start, end) if images is None else images, **extra}
    if labels:
        arrays["arr_1"] = np.arange(start, end) % 3
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / shard_name(start, end), **arrays)


@pytest.fixture
def run_dir(tmp_path):
    for start, end in reversed(RANGES):  # written out of order
        write_shard(tmp_path / "run" / "samples", start, end)
    return tmp_path / "run"


def read_like_a_streaming_evaluator(path, name="arr_0", batch=5):
    """Read a member as evaluators that stream from the zip do: the .npy header, then raw batches."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{name}.npy")
        assert info.compress_type == zipfile.ZIP_STORED
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            assert version == (1, 0)
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(member)
            assert not fortran_order
            row = int(np.prod(shape[1:])) * dtype.itemsize
            batches = []
            while chunk := member.read(row * batch):
                batches.append(np.frombuffer(chunk, dtype=dtype).reshape(-1, *shape[1:]))
    return np.concatenate(batches)


def test_merges_in_index_order_into_a_standard_npz(run_dir):
    out = collect(run_dir)
    assert out == str(run_dir / f"samples_17x{SIZE}x{SIZE}x3.npz")
    expected = images_for(0, 17)
    with np.load(out) as data:
        assert data["arr_0"].dtype == np.uint8 and np.array_equal(data["arr_0"], expected)
        assert np.array_equal(data["arr_1"], np.arange(17) % 3)
    assert np.array_equal(read_like_a_streaming_evaluator(out), expected)
    with Image.open(run_dir / "grid.png") as grid:
        assert grid.size == (5 * (SIZE + 2) + 2, 4 * (SIZE + 2) + 2)  # 17 images in a 5-column grid


def test_the_console_script_and_idiff_collect_write_the_same(run_dir, tmp_path):
    assert main([str(run_dir / "samples"), "-o", str(tmp_path / "a.npz")]) == 0
    idiff_in_process("collect", run_dir, "-o", tmp_path / "b.npz")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()


def test_missing_ranges_are_listed_unless_partial_output_is_allowed(run_dir, capsys):
    (run_dir / "samples" / shard_name(5, 7)).unlink()
    (run_dir / "samples" / shard_name(16, 17)).unlink()
    assert main([str(run_dir)]) == 2
    assert "missing sample indices [5, 7)" in capsys.readouterr().err
    assert not list(run_dir.glob("samples_*.npz"))

    assert main([str(run_dir), "--allow-partial"]) == 0
    assert "indices [5, 7) missing" in capsys.readouterr().err
    with np.load(run_dir / f"samples_14x{SIZE}x{SIZE}x3.npz") as data:
        assert np.array_equal(data["arr_0"], np.concatenate([images_for(0, 5), images_for(7, 16)]))


def truncate(path):
    path.write_bytes(path.read_bytes()[:-40])


BAD_SHARD_SETS = {
    "overlap": (lambda d: write_shard(d, 6, 9), "overlapping shards: shard-00000005-00000007.npz and "
                                                "shard-00000006-00000009.npz"),
    "shape": (lambda d: write_shard(d, 17, 19, images_for(17, 19, size=4)), "images are [4, 4, 3], but"),
    "dtype": (lambda d: write_shard(d, 17, 18, np.zeros((1, SIZE, SIZE, 3), np.float32)), "float32"),
    "count": (lambda d: write_shard(d, 17, 19, images_for(17, 18)), "holds 1 images, its name says 2"),
    "labels": (lambda d: write_shard(d, 17, 18, labels=False), "has no labels (arr_1)"),
    "corrupt": (lambda d: truncate(d / shard_name(7, 16)), "shard-00000007-00000016.npz: not a readable .npz"),
    "empty": (lambda d: write_shard(d, 20, 20), "empty or reversed index range [20, 20)"),
}


@pytest.mark.parametrize("case", BAD_SHARD_SETS)
def test_bad_shard_sets_are_refused_naming_the_problem(run_dir, capsys, case):
    damage, message = BAD_SHARD_SETS[case]
    damage(run_dir / "samples")
    assert main([str(run_dir), "--allow-partial"]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not list(run_dir.glob("samples_*")) and not list(run_dir.glob(".*.tmp"))


def test_a_corrupt_member_found_while_copying_is_named_and_leaves_no_output(run_dir, capsys):
    shard = run_dir / "samples" / shard_name(7, 16)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the image bytes: the headers still read, the CRC does not match
    shard.write_bytes(bytes(data))
    assert main([str(run_dir)]) == 2
    assert f"{shard}: not a readable .npz" in capsys.readouterr().err
    assert not list(run_dir.glob("samples_*")) and not list(run_dir.glob(".*.tmp"))


def test_an_existing_output_is_kept_unless_forced(run_dir, capsys):
    out = run_dir / f"samples_17x{SIZE}x{SIZE}x3.npz"
    out.write_bytes(b"previous")
    assert idiff_in_process("collect", run_dir, check=False).returncode == 2
    assert out.read_bytes() == b"previous"
    assert main([str(run_dir), "--force"]) == 0
    with np.load(out) as data:
        assert len(data["arr_0"]) == 17


def test_peak_memory_stays_near_one_shard(tmp_path):
    num_shards, per_shard, size = 40, 100, 32
    folder = tmp_path / "samples"
    for k in range(num_shards):
        write_shard(folder, k * per_shard, (k + 1) * per_shard, images_for(0, per_shard, size), labels=False)
    shard_bytes = per_shard * size * size * 3
    tracemalloc.start()
    try:
        out = collect(folder, tmp_path / "all.npz")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # One shard being copied, the read buffer and the preview grid; nothing that grows with the output.
    allowance = 2 * shard_bytes + 2**21
    assert peak < allowance < num_shards * shard_bytes / 4, f"peak {peak} B for {shard_bytes} B shards"
    with np.load(out) as data:
        assert data["arr_0"].shape == (num_shards * per_shard, size, size, 3)


def test_shards_without_labels_give_no_arr_1(tmp_path):
    for start, end in RANGES:
        write_shard(tmp_path, start, end, labels=False)
    with np.load(collect(tmp_path, tmp_path / "out.npz")) as data:
        assert data.files == ["arr_0"]
