"""Comparable FID: statistics files (guided-diffusion's layout), the reference cache, the protocol beside every
score, seed sets, and ``idiff compare``. Inception is randomly initialised (conftest's inception_weights)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import NUM_IMAGES, assert_refused, idiff_in_process, require_eval_extra, write_spec

from idiff.fidelity import fidelity_inputs, fidelity_metrics
from idiff.fidelity.cache import ReferenceCache
from idiff.storage import file_digest
from idiff.train.checkpoint_evaluations import record_evaluation

# Processes, real training and Inception: minutes on 2 cores, so `make test-all` (and CI) runs them.
pytestmark = pytest.mark.slow

ALL = ["fid", "sfid", "inception_score", "precision_recall"]


def scores(samples, reference, weights, metrics=ALL, cache_dir=None):
    inputs = fidelity_inputs(samples, reference, metrics, weights)
    return fidelity_metrics(inputs, metrics, "cpu", ReferenceCache(cache_dir) if cache_dir else None)


def evaluate_spec(root, name, **evaluate):
    run_dir = Path(root) / name
    spec = {"kind": "evaluate", "name": name, "run_dir": str(run_dir), "evaluate": evaluate}
    return write_spec(Path(root) / f"{name}.yaml", spec), run_dir


@pytest.fixture(scope="module")
def statistics_file(images, inception_weights, tmp_path_factory):
    """`idiff evaluate --make-reference` of the reference batch."""
    out = tmp_path_factory.mktemp("statistics") / "ref.npz"
    idiff_in_process("evaluate", "--make-reference", images["reference"], "--out", out,
                     "--inception-weights", inception_weights, "--device", "cpu")
    return str(out)


def test_a_statistics_file_is_guided_diffusions_layout_and_scores_as_its_images(images, inception_weights,
                                                                                statistics_file):
    with np.load(statistics_file, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    assert arrays["mu"].shape == (2048,) and arrays["sigma"].shape == (2048, 2048)
    assert arrays["mu_s"].shape == (2023,) and arrays["sigma_s"].shape == (2023, 2023)
    with np.load(images["reference"]) as data:
        np.testing.assert_array_equal(arrays["arr_0"], data["arr_0"])  # fewer than 10,000: all kept
    assert arrays["resolution"].tolist() == [16, 16] and int(arrays["num_images"]) == NUM_IMAGES
    assert str(arrays["inception_sha256"]) == file_digest(inception_weights)["sha256"]

    from_images = scores(images[16], images["reference"], inception_weights)
    from_file = scores(images[16], statistics_file, inception_weights)
    for metric, key in (("fid", "fid"), ("sfid", "sfid"), ("precision_recall", "precision"),
                        ("precision_recall", "recall"), ("inception_score", "mean")):
        assert from_file[metric][key] == pytest.approx(from_images[metric][key], rel=1e-9, abs=1e-9), metric
    assert from_images["fid"]["fid"] > 1e-3  # noisy images are not the reference: the equality means something
    assert from_file["protocol"]["reference"]["statistics"] == "file"
    assert from_file["protocol"]["reference"]["kind"] == "statistics"
    # Same statistics, so the same reference for comparability, though the files differ.
    assert from_file["protocol"]["reference"]["statistics_sha256"] == \
        from_images["protocol"]["reference"]["statistics_sha256"]


def test_a_guided_diffusion_batch_is_read_with_and_without_arr_0(images, inception_weights, statistics_file,
                                                                tmp_path, capfd):
    with np.load(statistics_file) as data:  # only what guided-diffusion's evaluator writes
        plain = {name: data[name] for name in ("mu", "sigma", "mu_s", "sigma_s", "arr_0")}
    np.savez(tmp_path / "with_images.npz", **plain)
    np.savez(tmp_path / "stats_only.npz", **{k: v for k, v in plain.items() if k != "arr_0"})
    expected = scores(images[16], statistics_file, inception_weights)
    with_images = scores(images[16], str(tmp_path / "with_images.npz"), inception_weights)
    assert with_images["precision_recall"] == expected["precision_recall"]
    assert with_images["fid"]["fid"] == expected["fid"]["fid"]
    capfd.readouterr()
    stats_only = scores(images[16], str(tmp_path / "stats_only.npz"), inception_weights, ["fid", "sfid"])
    assert stats_only["fid"]["fid"] == expected["fid"]["fid"] and stats_only["sfid"] == expected["sfid"]
    assert "without images or a recorded resolution" in capfd.readouterr().err  # its resolution cannot be checked
    assert stats_only["protocol"]["reference"]["resolution"] is None


class InceptionPasses:
    """Counts forward passes of torch-fidelity's Inception in this process (every module's hook, no stand-in)."""

    def __enter__(self):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.count = 0

        def hook(module, inputs, output):
            self.count += isinstance(module, FeatureExtractorInceptionV3)

        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_the_second_evaluation_reads_the_reference_statistics_from_the_cache(images, inception_weights, tmp_path,
                                                                           capfd):
    # NUM_IMAGES images are one batch: one pass per image set.
    with InceptionPasses() as first:
        computed = scores(images[16], images["reference_folder"], inception_weights, cache_dir=tmp_path)
    with InceptionPasses() as second:
        cached = scores(images[16], images["reference_folder"], inception_weights, cache_dir=tmp_path)
    assert (first.count, second.count) == (2, 1)  # samples and reference, then the samples only
    assert computed["protocol"]["reference"]["statistics"] == "computed"
    assert cached["protocol"]["reference"]["statistics"] == "cache"
    for metric in ALL:
        assert {k: v for k, v in cached[metric].items()} == computed[metric]

    other = tmp_path / "other-weights.pth"
    state = torch.load(inception_weights, weights_only=True)
    state["fc.bias"] = state["fc.bias"] + 1  # other weights: another hash
    torch.save(state, other)
    capfd.readouterr()
    with InceptionPasses() as third:
        scores(images[16], images["reference_folder"], str(other), cache_dir=tmp_path)
    assert third.count == 2 and "was made with Inception weights sha256" in capfd.readouterr().err
    with InceptionPasses() as fourth:
        scores(images[16], images["reference_folder"], str(other), cache_dir=tmp_path)
    assert fourth.count == 1  # the entry was replaced by the new weights' statistics


def bad_statistics(folder, name, **changes):
    dim = 2048
    arrays = {"mu": np.zeros(dim), "sigma": np.eye(dim, dtype=np.float32)}
    arrays.update(changes)
    path = Path(folder) / f"{name}.npz"
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return str(path)


def asymmetric():
    sigma = np.eye(2048, dtype=np.float32)
    sigma[0, 1] = 0.5
    return sigma


BAD_STATISTICS = {  # name: (changes, messages)
    "mu of the wrong shape": ({"mu": np.zeros(1000)}, ["mu has shape [1000], expected [2048]"]),
    "sigma of the wrong shape": ({"sigma": np.eye(3)}, ["sigma has shape [3, 3], expected [2048, 2048]"]),
    "non-finite sigma": ({"sigma": np.full((2048, 2048), np.nan, np.float32)}, ["sigma holds non-finite numbers"]),
    "non-symmetric sigma": ({"sigma": asymmetric()}, ["sigma is not symmetric"]),
    "missing sigma": ({"sigma": None}, ["has no sigma"]),
    "another resolution": ({"resolution": np.array([8, 8])}, ["evaluate.reference is 8x8 but the samples are 16x16"]),
}


@pytest.mark.parametrize("case", BAD_STATISTICS)
def test_a_bad_statistics_file_exits_2_naming_it(images, inception_weights, tmp_path, case):
    changes, messages = BAD_STATISTICS[case]
    path = bad_statistics(tmp_path, "bad-stats", **changes)
    spec = evaluate_spec(tmp_path, "bad", metrics=["fid"], samples=images["sample_run"], reference=path,
                         inception_weights=inception_weights)
    assert_refused("evaluate", *spec, [*messages, "bad-stats.npz"])


def test_precision_recall_needs_the_images_of_a_statistics_file(images, inception_weights, tmp_path):
    spec = evaluate_spec(tmp_path, "bad", metrics=["precision_recall"], samples=images["sample_run"],
                         reference=bad_statistics(tmp_path, "no-images"), inception_weights=inception_weights)
    assert_refused("evaluate", *spec, ["precision_recall needs reference images (arr_0)", "no-images.npz"])


@pytest.fixture(scope="module")
def sample_runs(trained):
    """One sample run of two seed sets of 2 images, and one of one set: 5 DDIM steps of the tiny model."""
    root, runs = trained["root"], {}
    for name, sets in (("two-sets", 2), ("one-set", 1)):
        spec = {"kind": "sample", "name": name, "run_dir": str(root / name),
                "sample": {"from_run": str(trained["run"]), "num_samples": 2, "seed_sets": sets, "batch_size": 4,
                           "sampler": "ddim", "steps": 5, "seed": 3}}
        idiff_in_process("sample", write_spec(root / f"{name}.yaml", spec))
        runs[name] = root / name
    return runs


def collected(run_dir):
    with np.load(next(Path(run_dir).glob("samples_*.npz"))) as data:
        return data["arr_0"]


def test_seed_sets_are_disjoint_and_each_is_reproducible(sample_runs):
    two, one = collected(sample_runs["two-sets"]), collected(sample_runs["one-set"])
    assert two.shape == (4, 16, 16, 3) and one.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(two[:2], one)  # set 0 is what a job of one set draws, and set 1 follows it
    assert all(not np.array_equal(two[i], two[j]) for i in range(2) for j in range(2, 4))  # other x_T: other images


def test_the_protocol_and_seed_sets_are_recorded_with_the_scores(sample_runs, trained, images, inception_weights):
    require_eval_extra()
    spec, run_dir = evaluate_spec(trained["root"], "protocol", metrics=["fid", "inception_score"],
                                  samples=str(sample_runs["two-sets"]), reference=images["reference"],
                                  inception_weights=inception_weights)
    idiff_in_process("evaluate", spec)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    p = metrics["protocol"]
    assert p["num_samples"] == 2 and p["seeds"] == {"seed": 3, "indices": [0, 4], "seed_sets": 2}
    assert p["reference"]["kind"] == "images-npz" and p["reference"]["statistics"] in ("computed", "cache")
    assert p["reference"]["sha256"] == file_digest(images["reference"])["sha256"]
    assert p["inception"]["weights_sha256"] == file_digest(inception_weights)["sha256"]
    assert p["feature_layer"] == "pool_3 (2048)"
    assert "uint8" in p["preprocessing"]["samples"] and "299" in p["preprocessing"]["inception_input"]
    assert p["torch_fidelity"] == require_eval_extra().__version__
    sampling = p["sampling"]
    assert (sampling["sampler"], sampling["steps"], sampling["noise_schedule"], sampling["diffusion_steps"]) == \
        ("ddim", 5, "cosine", 50)
    sets = metrics["fid"]["seed_sets"]
    assert [s["indices"] for s in sets["per_set"]] == [[0, 2], [2, 4]]
    per_set = [s["fid"] for s in sets["per_set"]]
    assert metrics["fid"]["fid"] == pytest.approx(np.mean(per_set)) == sets["mean"]["fid"]
    assert sets["min"]["fid"] == min(per_set) and sets["std"]["fid"] == pytest.approx(np.std(per_set, ddof=1))
    assert "minimum" in sets["note"]

    status = idiff_in_process("status", run_dir).stdout
    assert "protocol: 2 samples x 2 seed sets, seed 3 indices 0-4, ddim 5 steps" in status

    (trained["root"] / "train-like").mkdir()
    row = record_evaluation(trained["root"] / "train-like", 4, run_dir, None)  # the row of evals.jsonl
    assert row["protocol"] == p and row["metrics"]["fid"] == metrics["fid"]["fid"]


def test_compare_marks_scores_of_different_sample_counts_as_not_comparable(images, inception_weights, tmp_path):
    few = tmp_path / "three.npz"
    with np.load(images[16]) as data:
        np.savez(few, arr_0=data["arr_0"][:3])
    runs = {}
    for name, samples in (("four", images[16]), ("four-again", images[16]), ("three", str(few))):
        spec, runs[name] = evaluate_spec(tmp_path, name, metrics=["fid"], samples=samples,
                                         reference=images["reference"], inception_weights=inception_weights)
        idiff_in_process("evaluate", spec)
    same = idiff_in_process("compare", runs["four"], runs["four-again"] / "metrics.json").stdout
    assert "comparable" in same and "not comparable" not in same and " !" not in same
    out = idiff_in_process("compare", runs["four"], runs["three"]).stdout
    assert "[2] is not comparable with [1]: its protocol differs in num_samples" in out
    fid_row = next(line for line in out.splitlines() if line.startswith("fid "))
    assert fid_row.rstrip().endswith("!")  # marked, not hidden
    assert "* decides comparability: num_samples" in out
