"""Tuned schedules: the dynamic-programming search, `idiff tune-schedule`, and sample.schedule."""

import itertools
import json

import numpy as np
import pytest
import torch
import yaml
from test_ode_samplers import gaussian_problem, images, tiny_unet

from idiff.cli import main as idiff_main
from idiff.diffusion import samplers
from idiff.diffusion.ode_samplers import chain_start, points_for
from idiff.diffusion.schedule_search import FineReference, cheapest_path, tune_times


def test_the_dynamic_programme_finds_the_cheapest_path_of_a_given_length():
    rng = np.random.default_rng(0)
    n = 9
    costs = np.triu(rng.random((n, n)) + 0.1, k=1)
    costs[costs == 0] = np.inf
    for points in (2, 3, 5, 9):
        inner = itertools.combinations(range(1, n - 1), points - 2)
        best = min(([0, *middle, n - 1] for middle in inner), key=lambda p: sum(costs[a, b] for a, b in
                                                                                itertools.pairwise(p)))
        assert cheapest_path(costs, points) == best


def gaussian_tuning(name, steps, seed=5):
    diffusion, data, _ = gaussian_problem("cosine", 100)
    warm_up = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    reference = FineReference.solve(diffusion, data.eps_model, warm_up, clip_denoised=False)
    return diffusion, data, tune_times(diffusion, data.eps_model, reference, sampler=name, steps=steps)


@pytest.mark.parametrize("name, steps", [("dpmpp_2m", 5), ("unipc", 6), ("ipndm", 8), ("heun", 9), ("dpmpp_3m", 10)])
def test_a_tuned_schedule_is_a_grid_of_the_chain_no_worse_than_logsnr_uniform_on_held_out_data(name, steps):
    diffusion, data, result = gaussian_tuning(name, steps)
    times = result.times
    assert times[0] == chain_start(diffusion) and times[-1] == 0 and len(times) == points_for(name, steps)
    assert all(a > b for a, b in itertools.pairwise(times))
    assert result.nfe == 100 + len(result.candidates) * steps  # the reference, then one run per candidate
    held_out = torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    exact = data.exact(held_out)

    def error(**options):
        x_0 = samplers.sample(name, diffusion, data.eps_model, held_out, clip_denoised=False, steps=steps, **options)
        return float(((x_0 - exact) ** 2).mean().sqrt())

    assert error(times=times) <= 1.05 * error(spacing="logsnr_uniform")


def test_tuning_is_deterministic_and_depends_on_its_warm_up_images():
    _, _, first = gaussian_tuning("dpmpp_2m", 5)
    _, _, again = gaussian_tuning("dpmpp_2m", 5)
    assert first.times == again.times and first.candidates == again.candidates
    _, _, other = gaussian_tuning("dpmpp_2m", 5, seed=7)
    assert other.candidates != first.candidates


def test_on_gaussian_data_the_dynamic_programme_beats_the_fixed_spacings_at_few_steps():
    _, _, result = gaussian_tuning("dpmpp_2m", 5)
    assert result.candidates["dp_order_1"] < 0.5 * result.candidates["logsnr_uniform"], result.candidates


# ------------------------------------------------------------------------------ the command and sample.schedule
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    for seed in (0, 1):
        model, _ = tiny_unet(seed=seed)
        torch.save(model.state_dict(), root / f"tiny{seed}.pt")
    return root


def spec_file(root, name, **sample):
    spec = {"kind": "sample", "name": name, "run_dir": str(root / name),
            "model": {"image_size": 8, "num_channels": 32, "num_res_blocks": 1, "attention_resolutions": "4",
                      "channel_mult": "1,2", "learn_sigma": True, "class_cond": True, "num_classes": 3},
            "diffusion": {"diffusion_steps": 50, "noise_schedule": "cosine"},
            "sample": {"model_path": str(root / "tiny0.pt"), "num_samples": 3, "batch_size": 3,
                       "class_labels": "balanced", **sample}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path), root / name


@pytest.fixture(scope="module")
def tuned(tiny):
    spec, _ = spec_file(tiny, "to-tune", sampler="dpmpp_2m", steps=5)
    out = tiny / "schedule.json"
    assert idiff_main(["tune-schedule", spec, "--out", str(out), "--warmup", "4"]) == 0
    return out


def test_tune_schedule_writes_what_it_tuned_for_and_a_sample_job_uses_it(tiny, tuned, capsys):
    record = json.loads(tuned.read_text())
    assert record["sampler"] == "dpmpp_2m" and record["steps"] == 5 and record["warmup_images"] == 4
    assert record["seed"] == 1 and len(record["model_sha256"]) == 64 and record["seconds"] > 0
    assert record["nfe"] == 4 * record["nfe_per_image"] and record["rmse"] == min(record["candidates_rmse"].values())
    times = record["times"]
    assert len(times) == 5 and times[0] == 48 and times[-1] == 0 and all(a > b for a, b in itertools.pairwise(times))

    again = tiny / "again.json"
    spec, _ = spec_file(tiny, "to-tune", sampler="dpmpp_2m", steps=5)
    assert idiff_main(["tune-schedule", spec, "--out", str(again), "--warmup", "4"]) == 0
    assert json.loads(again.read_text())["times"] == times  # deterministic given the seed

    with_schedule, run_dir = spec_file(tiny, "tuned", sampler="dpmpp_2m", steps=5, schedule=str(tuned))
    assert idiff_main(["validate", with_schedule]) == 0
    assert f"dpmpp_2m 5 steps schedule {tuned}" in capsys.readouterr().out
    assert idiff_main(["sample", with_schedule]) == 0
    spec_times = spec_file(tiny, "spaced", sampler="dpmpp_2m", steps=5)[0]
    assert idiff_main(["sample", spec_times]) == 0
    tuned_images, spaced_images = images(run_dir), images(tiny / "spaced")
    assert tuned_images.shape == spaced_images.shape == (3, 8, 8, 3)
    if record["candidates_rmse"]["logsnr_uniform"] > record["rmse"]:  # another schedule than the default was kept
        assert not np.array_equal(tuned_images, spaced_images)


def edited(tiny, tuned, name, change):
    record = json.loads(tuned.read_text())
    change(record)
    path = tiny / f"{name}.json"
    path.write_text(json.dumps(record))
    return str(path)


BAD_SCHEDULES = {  # case: (sample fields besides the schedule, how the file is edited, message)
    "another sampler": ({"sampler": "unipc", "steps": 5}, None,
                        "was tuned for sampler dpmpp_2m, but this spec's sample.sampler is unipc"),
    "another step count": ({"sampler": "dpmpp_2m", "steps": 6}, None,
                           "was tuned for steps 5, but this spec's sample.steps is 6"),
    "another model": ({"sampler": "dpmpp_2m", "steps": 5, "model_path": "tiny1.pt"}, None,
                      "was tuned for another model"),
    "non-monotone": ({}, lambda r: r["times"].__setitem__(1, r["times"][2] - 0.5), "are not strictly decreasing"),
    "outside the chain": ({}, lambda r: r["times"].__setitem__(0, 49), "not from the chain's start 48 to 0"),
    "too many points": ({}, lambda r: r["times"].insert(1, r["times"][1] + 0.5), "6 points where the steps allow 5"),
    "not numbers": ({}, lambda r: r["times"].__setitem__(1, "x"), "times is not a list of numbers"),
}


@pytest.mark.parametrize("case", BAD_SCHEDULES)
def test_a_schedule_that_does_not_fit_exits_2_naming_the_file(tiny, tuned, case, capsys):
    fields, change, message = BAD_SCHEDULES[case]
    fields = {"sampler": "dpmpp_2m", "steps": 5, **fields}
    if "model_path" in fields:
        fields["model_path"] = str(tiny / fields["model_path"])
    schedule = edited(tiny, tuned, case.replace(" ", "-"), change) if change else str(tuned)
    spec, run_dir = spec_file(tiny, "bad-schedule", schedule=schedule, **fields)
    assert idiff_main(["sample", spec]) == 2
    err = capsys.readouterr().err
    assert f"sample.schedule: {schedule}" in err and message in err and "Traceback" not in err, err
    assert not run_dir.exists()


def test_a_corrupt_schedule_file_exits_2_naming_it(tiny, capsys):
    for name, content in {"corrupt.json": b"{\"times\": [48, 2", "foreign.json": b"[1, 2, 3]"}.items():
        (tiny / name).write_bytes(content)
        spec, run_dir = spec_file(tiny, "corrupt", sampler="dpmpp_2m", steps=5, schedule=str(tiny / name))
        assert idiff_main(["sample", spec]) == 2
        err = capsys.readouterr().err
        assert f"sample.schedule: {tiny / name} is not a schedule file" in err and not run_dir.exists(), err


@pytest.mark.parametrize("fields, message", [
    ({}, "tune-schedule needs sample.sampler"),
    ({"sampler": "dpmpp_2m"}, "tune-schedule needs sample.sampler"),
    ({"sampler": "ddim", "steps": 5}, "tune-schedule needs sample.sampler"),
])
def test_tune_schedule_without_an_ode_sampler_and_steps_exits_2(tiny, fields, message, capsys):
    spec, _ = spec_file(tiny, "untunable", **fields)
    out = tiny / "never.json"
    assert idiff_main(["tune-schedule", spec, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not out.exists()


def test_a_schedule_needs_an_ode_sampler_with_steps_and_no_spacing(tiny, tuned, capsys):
    for fields, message in [({"sampler": "ddim", "steps": 5}, "a tuned schedule is for an ODE solver"),
                            ({"sampler": "dpmpp_2m", "steps": 5, "spacing": "karras"},
                             "schedule and spacing both place the steps")]:
        spec, _ = spec_file(tiny, "schedule-fields", schedule=str(tuned), **fields)
        assert idiff_main(["validate", spec]) == 2
        assert f"sample.schedule: {message}" in capsys.readouterr().err
