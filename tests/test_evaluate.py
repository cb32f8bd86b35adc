"""Evaluate jobs: NLL over ranks, and FID / IS / precision-recall through torch-fidelity's real loading path."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import NUM_IMAGES, assert_refused, idiff, require_eval_extra, write_spec

from idiff.fidelity import fidelity_inputs, fidelity_metrics


def evaluate_spec(root, name, **evaluate):
    run_dir = Path(root) / name
    spec = {"kind": "evaluate", "name": name, "run_dir": str(run_dir), "evaluate": evaluate}
    return write_spec(Path(root) / f"{name}.yaml", spec), run_dir


@pytest.mark.slow
def test_nll_over_two_ranks_equals_one_rank(trained, shapes_dir):
    options = {"metrics": ["nll"], "from_run": str(trained["run"]), "data_dir": shapes_dir, "num_samples": 6,
               "batch_size": 4}
    results = {}
    for nproc in (1, 2):
        spec_path, run_dir = evaluate_spec(trained["root"], f"nll-{nproc}", **options)
        stderr = idiff("evaluate", spec_path, "--nproc", nproc).stderr
        # Progress in timesteps, a line every twentieth of rank 0's (not a terminal): a part of 4 images through
        # 50 timesteps is not minutes of silence.
        lines = re.findall(r"^nll: step (\d+)/(\d+) ", stderr, re.M)
        assert len(lines) >= 10 and lines[-1][0] == lines[-1][1] and int(lines[-1][1]) % 50 == 0, stderr
        nll = json.loads((run_dir / "eval" / "nll.json").read_text())
        assert json.loads((run_dir / "metrics.json").read_text()) == {"nll": nll}
        with np.load(run_dir / "eval" / "nll_terms.npz") as data:
            results[nproc] = nll, {name: data[name] for name in data.files}
    (nll, terms), (nll_2, terms_2) = results[1], results[2]
    assert nll["num_images"] == 6 and nll["num_timesteps"] == 50 and 0 < nll["bpd"] < 20
    assert terms["total_bpd"].shape == (6,) and terms["vb_per_timestep"].shape == (50,)
    assert set(terms) == {"total_bpd", "prior_bpd", "vb_per_timestep", "mse_per_timestep", "xstart_mse_per_timestep"}
    # The total is the prior plus every timestep's term, per image, so also on average.
    assert terms["total_bpd"].mean() == pytest.approx(terms["vb_per_timestep"].sum() + terms["prior_bpd"].mean())
    for name in terms:  # each image's noise comes from its own generator, whichever rank draws it
        np.testing.assert_allclose(terms_2[name], terms[name], rtol=1e-5, atol=1e-7)
    assert nll_2["bpd"] == pytest.approx(nll["bpd"], rel=1e-6)


@pytest.mark.slow
def test_fid_is_and_precision_recall_of_a_sample_run_against_its_image_files(images, inception_weights, tmp_path):
    spec_path, run_dir = evaluate_spec(tmp_path, "fidelity", metrics=["fid", "inception_score", "precision_recall"],
                                       samples=images["sample_run"], reference=images["reference_folder"],
                                       inception_weights=inception_weights)
    stderr = idiff("evaluate", spec_path).stderr
    # Inception on a CPU takes minutes at scale: each image set's pass shows its progress.
    for what in ("samples", "reference"):
        assert re.search(rf"^inception {what}: img {NUM_IMAGES}/{NUM_IMAGES} \(100\.0%\)", stderr, re.M), stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for name in ("fid", "inception_score", "precision_recall"):
        assert json.loads((run_dir / "eval" / f"{name}.json").read_text()) == metrics[name]
        assert metrics[name]["num_samples"] == metrics[name]["num_reference"] == NUM_IMAGES
    assert abs(metrics["fid"]["fid"]) < 1e-3
    # IS is at least 1; with one thread it came out as 1 - 1e-16
    assert metrics["inception_score"]["mean"] >= 1 - 1e-9 and np.isfinite(metrics["inception_score"]["std"])
    assert metrics["precision_recall"]["precision"] == metrics["precision_recall"]["recall"] == 1


@pytest.mark.slow
def test_fid_grows_with_the_noise_added(images, inception_weights):
    # Noise level 0, FID(x, x) ~ 0, is the test above: each level costs 2 x NUM_IMAGES Inception passes.
    fid = [fidelity_metrics(fidelity_inputs(images[sigma], images["reference"], ["fid"], inception_weights),
                            ["fid"], "cpu")["fid"]["fid"] for sigma in (16, 48)]
    assert 1e-3 < fid[0] < fid[1], fid


def unpickles_code(folder):
    path = Path(folder) / "inception-with-code.pth"
    torch.save({"weight": torch.zeros(1), "payload": Path("/")}, path)
    return str(path)


BAD_INPUTS = {  # name: (images, tmp folder -> evaluate section, messages)
    "missing weights file": (lambda im, tmp: {"inception_weights": str(tmp / "nowhere.pth")}, [
        "Inception weights not found at", "nowhere.pth", "weights-inception-2015-12-05-6726825d.pth",
        "set evaluate.inception_weights"]),
    "weights that unpickle code": (lambda im, tmp: {"inception_weights": unpickles_code(tmp)},
                                   ["is not a plain state dict of tensors"]),
    "reference of another resolution": (lambda im, tmp: {"reference": im["small"]}, [
        "evaluate.reference is 8x8 but the samples are 16x16"]),
    "too few images for precision/recall": (lambda im, tmp: {"metrics": ["precision_recall"], "samples": im["few"]}, [
        "precision_recall needs at least 4 images, but evaluate.samples", "few.npz) has 3"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_and_writes_nothing(images, inception_weights, tmp_path, case):
    make_section, messages = BAD_INPUTS[case]
    section = {"metrics": ["fid"], "samples": images["sample_run"], "reference": images["reference"],
               "inception_weights": inception_weights, **make_section(images, tmp_path)}
    assert_refused("evaluate", *evaluate_spec(tmp_path, "bad", **section), messages)


def test_without_a_configured_file_the_weights_are_looked_for_in_the_torch_hub_cache(images, tmp_path):
    require_eval_extra()
    spec = evaluate_spec(tmp_path, "cache", metrics=["fid"], samples=images["sample_run"],
                         reference=images["reference"])
    assert_refused("evaluate", *spec, [f"put it in {tmp_path / 'torch' / 'hub' / 'checkpoints'}/"],
                   env={"TORCH_HOME": str(tmp_path / "torch")})
