"""Every spec that validates is written to ``spec.yaml`` and read back, on each resume, with the same meaning.

A property over generated specs: each combination of the sampling fields (the sampler, the legacy ``use_ddim``
and ``timestep_respacing``, ``steps``, ``spacing``, ``eta``) and of the training end conditions, whichever of
them validate, must survive ``dump_spec`` and ``load_spec`` unchanged.
"""

import itertools
import random
from pathlib import Path

import pytest
import yaml
from conftest import TINY_MODEL

from idiff.diffusion.ode_samplers import SPACINGS
from idiff.diffusion.samplers import SAMPLERS
from idiff.jobspec.load import SpecError, dump_spec, parse_spec
from idiff.run_dir import OWNER_MARK, RunDir, check_run_dir, claim_run_dir

ABSENT = object()  # the field is left out of the generated spec


def _with(section: dict, **fields) -> dict:
    return {**section, **{k: v for k, v in fields.items() if v is not ABSENT}}


def sample_sections():
    """The sample sections of every combination of the sampling fields, each value absent or given."""
    for sampler, use_ddim, steps, respacing, spacing, eta in itertools.product(
            [ABSENT, None, *SAMPLERS], [ABSENT, True, False], [ABSENT, None, 4, 20], [ABSENT, "", "10", "ddim10"],
            [ABSENT, None, *SPACINGS], [ABSENT, 0.0, 0.5]):
        yield _with({"model_path": "model.pt", "num_samples": 8}, sampler=sampler, use_ddim=use_ddim, steps=steps,
                    timestep_respacing=respacing, spacing=spacing, eta=eta)


def train_sections():
    """Training sections over the fields that end a run and the ones a validator fills in or normalizes."""
    for max_steps, max_images, anneal, ema, microbatch in itertools.product(
            [ABSENT, None, 12], [ABSENT, None, 40], [ABSENT, 0, 12, 20], [ABSENT, "0.9,0.99", " 0.9999 ,"],
            [ABSENT, None, "auto", 4]):
        yield _with({"data_dir": "data", "batch_size": 8}, max_steps=max_steps, max_images=max_images,
                    lr_anneal_steps=anneal, ema_rate=ema, microbatch=microbatch)


def draw(combinations, n: int, seed: int):
    """``n`` of the combinations, drawn the same way on every run (all of them would take seconds)."""
    combinations = list(combinations)
    return random.Random(seed).sample(combinations, min(n, len(combinations)))


def specs(tmp_path):
    common = {"name": "r", "run_dir": str(tmp_path / "run"), "model": dict(TINY_MODEL),
              "diffusion": {"diffusion_steps": 50}}
    for sample in draw(sample_sections(), 600, 0):
        yield {**common, "kind": "sample", "sample": sample}
    for train in draw(train_sections(), 150, 1):
        yield {**common, "kind": "train", "train": train}
    for metrics in ["nll", "nll,fid", ["fid"]]:
        yield {**common, "kind": "evaluate", "evaluate": {
            "metrics": metrics, "model_path": "model.pt", "data_dir": "data", "samples": "s.npz", "reference": "r"}}


def valid_specs(tmp_path):
    for data in specs(tmp_path):
        try:
            yield data, parse_spec(data)
        except SpecError:
            continue


def test_every_valid_spec_survives_its_own_round_trip(tmp_path):
    checked = 0
    for data, job in valid_specs(tmp_path):
        try:
            again = parse_spec(yaml.safe_load(dump_spec(job)), source="spec.yaml")
        except SpecError as err:
            pytest.fail(f"{data} validates, but its dump does not:\n{err}")
        assert again.model_dump() == job.model_dump(), data
        assert again.run_hash() == job.run_hash(), data
        if job.kind == "sample":
            for meaning in ("sampler_name", "chain_respacing", "sampler_options", "sampling"):
                assert getattr(again.sample, meaning) == getattr(job.sample, meaning), (meaning, data)
        checked += 1
    assert checked > 150  # the generator reaches many valid specs, of every kind


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_a_sample_run_dir_of_each_sampler_is_taken_again_on_resume(tmp_path, sampler):
    """The bug this guards: ``sampler: ddim`` wrote ``use_ddim: false`` beside it, which the second start refused."""
    data = {"kind": "sample", "name": "r", "run_dir": str(tmp_path / sampler), "model": dict(TINY_MODEL),
            "diffusion": {"diffusion_steps": 50},
            "sample": {"model_path": "model.pt", "sampler": sampler, "steps": 6}}
    job = parse_spec(data)
    run_dir = claim_run_dir(job)
    assert RunDir(run_dir.path).saved_job().sample.sampler_name == sampler
    assert Path(run_dir.spec_file).read_text().startswith(OWNER_MARK)
    check_run_dir(parse_spec(data))  # the requeued job's start: no SpecError


def test_use_ddim_false_beside_sampler_ddim_is_still_refused(tmp_path):
    data = {"kind": "sample", "name": "r", "model": dict(TINY_MODEL),
            "sample": {"model_path": "m.pt", "sampler": "ddim", "use_ddim": False}}
    with pytest.raises(SpecError, match="use_ddim: false contradicts sampler: ddim"):
        parse_spec(data)
