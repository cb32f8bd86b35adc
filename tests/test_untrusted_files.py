"""Files from elsewhere (tarballs, LMDBs, image folders, sample shards, NLL parts) as an adversary would make them:
names that would escape --out, arrays of the wrong shape, headers that claim gigabytes, shards under another name."""

import io
import shutil
import tarfile
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, idiff_in_process, write_spec
from test_data_prepare import CIFAR_CLASSES, add_pickle, encoded, lsun_lmdb

import idiff.shards
from idiff.cli import main
from idiff.collect import collect
from idiff.collect import main as collect_main
from idiff.errors import UserError
from idiff.shards import Shard, shard_name, shard_problem, write_shard


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def refused(capsys, argv, *messages) -> str:
    """``idiff ARGV`` exits 2 with ``messages`` and no traceback; returns stderr."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    for message in messages:
        assert message in err, err
    assert "Traceback" not in err
    return err


# ------------------------------------------------------------------------------------------- CIFAR-10


def cifar_tarball(path, label_names=CIFAR_CLASSES, data=None, labels=(3, 7)):
    """The test split only: two images (or ``data``) with ``labels``, and ``label_names`` in batches.meta."""
    rows = np.random.default_rng(0).integers(0, 256, (2, 3072), dtype=np.uint8) if data is None else data
    with tarfile.open(path, "w:gz") as tar:
        add_pickle(tar, "batches.meta", {"label_names": list(label_names), "num_vis": 3072})
        add_pickle(tar, "test_batch", {"data": rows, "labels": list(labels), "batch_label": "test"})
    return path


ESCAPING_NAMES = {"parent": "../../escaped", "absolute": "/ABSOLUTE/escaped", "backslash": "..\\escaped",
                  "dotdot": "..", "empty": "", "nul": "cat\x00.png", "newline": "cat\nrm -rf", "escape": "\x1b[31mcat"}


@pytest.mark.parametrize("case", ESCAPING_NAMES)
def test_cifar_label_names_that_are_not_plain_file_names_are_refused(tmp_path, capsys, case):
    name = ESCAPING_NAMES[case].replace("/ABSOLUTE", str(tmp_path))
    src = cifar_tarball(tmp_path / "cifar.tar.gz", [name, *CIFAR_CLASSES[1:]], labels=(0, 0))
    out = tmp_path / "a" / "b" / "out"  # ../../ from its staging folder is tmp_path
    before = files_under(tmp_path)
    refused(capsys, ["data", "cifar10", "--src", src, "--out", out, "--split", "test"],
            f"batches.meta in {src}: {name!r} cannot be used as a file name")
    assert files_under(tmp_path) - before <= {"a", "a/b"}  # no image anywhere, no staging folder left


BAD_BATCHES = {  # name: (tarball keyword arguments, message)
    "short rows": ({"data": np.zeros((2, 100), np.uint8)}, "data is uint8 [2, 100], expected uint8 [N, 3072]"),
    "float pixels": ({"data": np.zeros((2, 3072), np.float64)}, "data is float64 [2, 3072]"),
    "label too large": ({"labels": (3, 10)}, "label 10 is not one of the 10 classes"),
    "negative label": ({"labels": (-1, 2)}, "label -1 is not one of the 10 classes"),
    "missing label": ({"labels": (3,)}, "1 labels for 2 images"),
}


@pytest.mark.parametrize("case", BAD_BATCHES)
def test_cifar_batches_of_the_wrong_shape_or_labels_exit_2(tmp_path, capsys, case):
    options, message = BAD_BATCHES[case]
    src = cifar_tarball(tmp_path / "cifar.tar.gz", **options)
    refused(capsys, ["data", "cifar10", "--src", src, "--out", tmp_path / "out", "--split", "test"],
            f"test_batch in {src}: {message}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar.tar.gz"]


# ------------------------------------------------------------------------------------------- LSUN, ImageNet


def test_an_lsun_prefix_that_would_leave_out_is_refused(tmp_path, capsys):
    src = lsun_lmdb(tmp_path / "bedroom_train_lmdb", [encoded(20, 20, "WEBP", 0)])
    refused(capsys, ["data", "lsun", "--src", src, "--out", tmp_path / "out", "--prefix", "../escaped"],
            "--prefix: '../escaped' cannot be used as a file name")
    assert not list(tmp_path.glob("escaped*")) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("folder", ["n01\\x", "n01\x1bx", "n01\nx"], ids=["backslash", "escape", "newline"])
def test_imagenet_synset_folders_with_separators_or_control_characters_are_refused(tmp_path, capsys, folder):
    (tmp_path / "train" / folder).mkdir(parents=True)
    (tmp_path / "train" / folder / "a.JPEG").write_bytes(encoded(12, 10, "JPEG", 0))
    refused(capsys, ["data", "imagenet", "--src", tmp_path / "train", "--out", tmp_path / "out"],
            f"class folder in {tmp_path / 'train'}: {folder!r} cannot be used as a file name")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- shards


def lying_npz(path, shape, data=b"\0" * 64):
    """An .npz whose arr_0 header claims ``shape`` (uint8) while the member holds only ``data``."""
    npy = io.BytesIO()
    np.lib.format.write_array_header_1_0(npy, {"descr": "|u1", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("arr_0.npy", npy.getvalue() + data)
    return path


def shard_images(start, end, size=8):
    return ((np.arange(start, end)[:, None, None, None] + np.zeros((1, size, size, 3))) % 251).astype(np.uint8)


def test_a_shard_header_claiming_40000_squared_images_is_refused_before_allocating(tmp_path, capsys):
    folder = tmp_path / "samples"
    folder.mkdir()
    lying_npz(folder / shard_name(0, 5), (5, 40000, 40000, 3))
    tracemalloc.start()
    try:
        assert collect_main([str(folder), "-o", str(tmp_path / "out.npz")]) == 2
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    err = capsys.readouterr().err
    assert "arr_0's header declares uint8 [5, 40000, 40000, 3] (24000000000 bytes), but the file holds 64" in err
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples"]


def test_every_npz_reader_checks_the_headers_first(tmp_path):
    path = lying_npz(tmp_path / "reference.npz", (50000, 64, 64, 3))
    with pytest.raises(UserError, match="declares uint8 \\[50000, 64, 64, 3\\]"):
        idiff.shards.read_npz(path)


def test_a_shard_copied_under_another_ranges_name_is_refused_not_merged(tmp_path, capsys):
    folder = tmp_path / "samples"
    for start, end in [(0, 5), (5, 10)]:
        write_shard(folder, start, end, {"arr_0": shard_images(start, end)})
    shutil.copy(folder / shard_name(0, 5), folder / shard_name(10, 15))
    assert collect_main([str(folder), "-o", str(tmp_path / "out.npz")]) == 2
    err = capsys.readouterr().err
    assert f"{folder / shard_name(10, 15)}: holds indices [0, 5), but its name says [10, 15)" in err
    assert not (tmp_path / "out.npz").exists()
    (folder / shard_name(10, 15)).unlink()
    with np.load(collect(folder, tmp_path / "out.npz")) as data:  # idiff's own shards merge as before
        assert data.files == ["arr_0"] and np.array_equal(data["arr_0"], shard_images(0, 10))


def test_a_shard_counts_only_with_the_expected_arrays_and_its_own_range(tmp_path):
    expected = {"arr_0": ((2, 8, 8, 3), np.uint8)}
    write_shard(tmp_path, 0, 2, {"arr_0": shard_images(0, 2)})
    good = Shard(0, 2, str(tmp_path / shard_name(0, 2)))
    assert shard_problem(good, expected) is None
    assert "expected arr_0 uint8 [2, 16, 16, 3]" in shard_problem(good, {"arr_0": ((2, 16, 16, 3), np.uint8)})
    moved = tmp_path / shard_name(2, 4)
    shutil.copy(good.path, moved)
    assert "holds indices [0, 2), but its name says [2, 4)" in shard_problem(Shard(2, 4, str(moved)), expected)
    flipped = bytearray(Path(good.path).read_bytes())
    flipped[200] ^= 0xFF  # inside arr_0's pixels: the headers read, the CRC does not
    Path(good.path).write_bytes(bytes(flipped))
    assert "not a readable .npz" in shard_problem(good, expected)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A tiny unconditional model's random weights, as a released .pt."""
    path = tmp_path_factory.mktemp("released") / "model.pt"
    torch.manual_seed(0)
    torch.save(idiff.create_model_and_diffusion(**TINY_MODEL)[0].state_dict(), path)
    return path


def job_spec(root, kind, name, section, diffusion_steps=50) -> tuple[str, Path]:
    run_dir = Path(root) / name
    spec = {"kind": kind, "name": name, "run_dir": str(run_dir), "model": dict(TINY_MODEL),
            "diffusion": {"diffusion_steps": diffusion_steps, "noise_schedule": "cosine"}, kind: section}
    return write_spec(Path(root) / f"{name}.yaml", spec), run_dir


def test_a_sample_rerun_redraws_corrupt_foreign_and_oversized_shards(released, tmp_path):
    spec_path, run_dir = job_spec(tmp_path, "sample", "sample", {
        "model_path": str(released), "num_samples": 6, "batch_size": 2, "use_ddim": True,
        "timestep_respacing": "ddim2"})
    idiff_in_process("sample", spec_path)
    samples = run_dir / "samples"
    drawn = {p.name: p.read_bytes() for p in samples.iterdir()}
    output = (run_dir / "samples_6x16x16x3.npz").read_bytes()

    (samples / shard_name(2, 4)).write_bytes(drawn[shard_name(0, 2)])  # a copy under another range's name
    corrupt = bytearray(drawn[shard_name(0, 2)])
    corrupt[len(corrupt) // 2] ^= 0xFF
    (samples / shard_name(0, 2)).write_bytes(bytes(corrupt))
    lying_npz(samples / shard_name(4, 6), (2, 40000, 40000, 3))
    rerun = idiff_in_process("sample", spec_path)
    assert "sampling 6 images (0 already in shards)" in rerun.stderr
    for name in (shard_name(0, 2), shard_name(2, 4), shard_name(4, 6)):
        assert f"{samples / name} does not count" in rerun.stderr
        assert (samples / name).read_bytes() == drawn[name]
        assert (samples / f"{name}.rejected").exists()
    assert (run_dir / "samples_6x16x16x3.npz").read_bytes() == output


def test_an_nll_rerun_recomputes_a_corrupt_part(released, shapes_dir, tmp_path):
    spec_path, run_dir = job_spec(tmp_path, "evaluate", "nll", {
        "metrics": ["nll"], "model_path": str(released), "data_dir": shapes_dir, "num_samples": 2, "batch_size": 1},
        diffusion_steps=10)
    idiff_in_process("evaluate", spec_path)
    parts = run_dir / "eval" / "nll_parts"
    first = (parts / shard_name(1, 2)).read_bytes()
    nll = (run_dir / "eval" / "nll.json").read_text()
    (parts / shard_name(1, 2)).write_bytes(first[:-40])  # truncated
    rerun = idiff_in_process("evaluate", spec_path)
    assert f"{parts / shard_name(1, 2)} does not count" in rerun.stderr
    assert (parts / shard_name(1, 2)).read_bytes() == first
    assert (run_dir / "eval" / "nll.json").read_text() == nll
