"""Job specs and the command line: validation messages, the original's flags, run-dir ownership."""

import os
import re
from pathlib import Path

import pytest
import yaml
from conftest import assert_refused, idiff_in_process, tiny_spec, write_spec

from idiff.cli import main as idiff_main
from idiff.factory import model_and_diffusion_defaults, sr_model_and_diffusion_defaults
from idiff.jobspec.docs import spec_reference

REPO = Path(__file__).resolve().parents[1]


def test_every_spec_in_jobs_validates():
    specs = sorted(str(p) for p in (REPO / "jobs").glob("*.yaml"))
    assert len(specs) >= 13
    out = idiff_in_process("validate", *specs).stdout.splitlines()
    assert len(out) == len(specs) and all(": ok: " in line for line in out)


def test_the_paper_configurations_are_all_there():
    names = {p.stem for p in (REPO / "jobs").glob("*.yaml")}
    assert {"cifar10_hybrid", "cifar10_vlb", "imagenet64_hybrid", "imagenet64_vlb", "imagenet64_cond",
            "upsample_64_256", "lsun_bedroom", "lsun_bedroom_lr2e-5", "demo"} <= names
    vlb = yaml.safe_load((REPO / "jobs" / "cifar10_vlb.yaml").read_text())
    assert vlb["diffusion"]["use_kl"] and vlb["train"]["schedule_sampler"] == "loss-second-moment"
    cond = yaml.safe_load((REPO / "jobs" / "imagenet64_cond.yaml").read_text())
    assert cond["train"]["batch_size"] == 2048 and cond["train"]["lr"] == 3e-4
    assert cond["diffusion"]["rescale_timesteps"] is False


def test_spec_reference_is_generated_from_the_models():
    assert (REPO / "docs" / "spec.md").read_text() == spec_reference(), "run: idiff spec --docs > docs/spec.md"


def rejected(tmp_path, spec, *extra, match):
    """A train spec (dict, or a path) that exits 2 naming the problem, with nothing written to its run dir."""
    if isinstance(spec, dict):
        return assert_refused("train", write_spec(tmp_path / "bad.yaml", spec), spec["run_dir"], [match], *extra)
    return assert_refused("train", spec, None, [match], *extra)


@pytest.fixture
def good(shapes_dir, tmp_path):
    return tiny_spec(shapes_dir, tmp_path / "run")


def test_unknown_key_with_a_suggestion_and_its_line(tmp_path, good):
    good["train"]["lrr"] = 0.1
    err = rejected(tmp_path, good, match="train.lrr: unknown key; did you mean 'lr'?")
    assert "line " in err


@pytest.mark.parametrize("section,key,value,match", [
    ("train", "lr", -1, "train.lr: Input should be greater than 0 (got -1)"),
    ("train", "batch_size", 0, "train.batch_size: Input should be greater than 0 (got 0)"),
    ("train", "batch_size", -8, "train.batch_size: Input should be greater than 0 (got -8)"),
    ("model", "image_size", "big", "model.image_size: Input should be a valid integer"),
    ("train", "precision", "fp8", "train.precision: Input should be 'fp32', 'bf16' or 'fp16'"),
    ("train", "microbatch", 16, "microbatch (16) is larger than the global batch_size (8)"),
    ("model", "channel_mult", "1,x", "model.channel_mult: expected comma-separated positive integers"),
])
def test_wrong_types_and_ranges_name_the_field(tmp_path, good, section, key, value, match):
    good[section][key] = value
    rejected(tmp_path, good, match=match)


def test_missing_data_dir_field_and_missing_folder(tmp_path, good):
    del good["train"]["data_dir"]
    rejected(tmp_path, good, match="train.data_dir: required, but missing")
    good["train"]["data_dir"] = str(tmp_path / "nowhere")
    rejected(tmp_path, good, match=f"{tmp_path / 'nowhere'}")


def refused_by_the_ranks(capfd, tmp_path, spec, nproc, match):
    """What the ranks check (their share of the batch): they are processes of their own, so their message is
    read from the file descriptors they inherit. Each exits 2 before writing the run dir."""
    assert idiff_main(["train", write_spec(tmp_path / "bad.yaml", spec), "--nproc", str(nproc)]) == 2
    err = capfd.readouterr().err
    assert match in err and "Traceback" not in err, err[-3000:]
    assert not Path(spec["run_dir"]).exists()


@pytest.mark.slow  # starts the ranks, each a Python that imports torch
def test_microbatch_larger_than_the_rank_batch(capfd, tmp_path, good):
    good["train"]["microbatch"] = 6
    refused_by_the_ranks(capfd, tmp_path, good, 2, match="train.microbatch=6 is larger than the per-rank batch 4")


@pytest.mark.slow  # starts the ranks, each a Python that imports torch
def test_a_batch_that_does_not_split_lists_world_sizes_that_work(capfd, tmp_path, good):
    refused_by_the_ranks(capfd, tmp_path, good, 3, match="world sizes that work: 1, 2, 4, 8")


def test_class_cond_without_labels_names_a_file(tmp_path, good):
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for i, src in enumerate(sorted(Path(good["train"]["data_dir"]).iterdir())[:4]):
        (folder / f"img{i}.png").write_bytes(src.read_bytes())
    good["train"]["data_dir"] = str(folder)
    good["model"]["class_cond"] = True
    rejected(tmp_path, good, match="img0.png")


def test_malformed_yaml_gives_its_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("kind: train\nname: x\ntrain:\n  batch_size: 8\n   lr: 1\n")
    err = rejected(tmp_path, str(path), match="not valid YAML")
    assert f"{path}:5:" in err


def test_unknown_kind(tmp_path, good):
    good["kind"] = "finetune"
    rejected(tmp_path, good, match="kind must be one of train, sample, evaluate")


def test_a_run_dir_of_another_spec_is_refused_unless_forced(tmp_path, good):
    good["train"].update(max_steps=1, num_workers=0)  # what is asked here is about the run dir, not the data
    path = write_spec(tmp_path / "a.yaml", good)
    idiff_in_process("train", path)
    again = idiff_in_process("train", path)  # identical spec: resumes, nothing to do
    assert "start at step 1" in again.stderr
    changed = dict(good, train={**good["train"], "lr": 5e-4})
    err = rejected(tmp_path, write_spec(tmp_path / "b.yaml", changed), match="holds a run of another spec")
    assert "train.lr" in err and "--force-new" in err
    assert yaml.safe_load((Path(good["run_dir"]) / "spec.yaml").read_text())["train"]["lr"] == 1e-4
    forced = idiff_in_process("train", tmp_path / "b.yaml", "--force-new")
    assert "start at step 0" in forced.stderr
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(moved) == 1 and (moved[0] / "checkpoints" / "model000001.pt").exists()  # nothing lost


def test_set_overrides_and_validate_summary(tmp_path, good):
    path = write_spec(tmp_path / "a.yaml", good)
    out = idiff_in_process("validate", path, "--set", "train.lr=2e-5", "--set", "resources.nodes=2").stdout
    assert "lr 2e-05" in out and "2 node(s)" in out
    assert idiff_in_process("validate", path, "--set", "train.lr", check=False).returncode == 2


IMAGE_TRAIN_FLAGS = ["data_dir", "schedule_sampler", "lr", "weight_decay", "lr_anneal_steps", "batch_size",
                     "microbatch", "ema_rate", "log_interval", "save_interval", "resume_checkpoint", "use_fp16",
                     "fp16_scale_growth"]


def help_options(capsys, *command) -> dict[str, str]:
    """``idiff COMMAND --help`` as {option: its help text}: a flag counts only where it is listed itself
    (``--lr`` is not found inside ``--lr_anneal_steps``)."""
    with pytest.raises(SystemExit) as done:
        idiff_main([*command, "--help"])
    assert done.value.code == 0
    options, current = {}, None
    for line in capsys.readouterr().out.splitlines():
        listed = re.match(r"  (?:-\w, )?(--[\w-]+)(.*)", line)  # an option's first line; deeper lines continue it
        if listed:
            current = listed.group(1)
            options[current] = listed.group(2).strip()
        elif current and line.startswith("    "):
            options[current] += " " + line.strip()
        else:
            current = None
    return options


def test_every_flag_of_the_original_scripts_is_accepted(capsys):
    model_flags = [f"--{k}" for k in model_and_diffusion_defaults()]
    sr_flags = [f"--{k}" for k in sr_model_and_diffusion_defaults()]
    for kind, flags in [("train", model_flags + [f"--{k}" for k in IMAGE_TRAIN_FLAGS]),
                        ("train", sr_flags),
                        ("sample", model_flags + ["--clip_denoised", "--num_samples", "--batch_size", "--use_ddim",
                                                  "--model_path"]),
                        ("sample", sr_flags + ["--base_samples"]),
                        ("evaluate", model_flags + ["--data_dir", "--clip_denoised", "--num_samples", "--batch_size",
                                                    "--model_path"])]:
        options = help_options(capsys, kind)
        missing = [flag for flag in flags if flag not in options]
        assert not missing, f"{kind}: {missing}"
        if kind == "train":
            assert re.search(r"\bdefault: 0\.0001\]", options["--lr"]), options["--lr"]


def test_spec_from_the_originals_flags():
    def spec_from(*flags) -> dict:
        return yaml.safe_load(idiff_in_process("spec", "--from-flags", *flags).stdout)

    spec = spec_from("train", "--data_dir", "D", "--image_size", "64", "--num_channels", "128", "--num_res_blocks",
                     "3", "--learn_sigma", "True", "--diffusion_steps", "4000", "--noise_schedule", "cosine", "--lr",
                     "1e-4", "--batch_size", "128", "--microbatch", "16", "--use_fp16", "True", "--class_cond", "f",
                     "--max_steps", "10")
    assert spec["kind"] == "train" and spec["name"].startswith("train-")
    assert spec["model"]["num_res_blocks"] == 3 and spec["model"]["learn_sigma"] is True
    assert spec["model"]["class_cond"] is False
    assert spec["diffusion"]["diffusion_steps"] == 4000 and spec["diffusion"]["noise_schedule"] == "cosine"
    assert spec["train"] == {**spec["train"], "lr": 1e-4, "batch_size": 128, "microbatch": 16, "precision": "fp16"}
    no_micro = spec_from("train", "--data_dir", "D", "--batch_size", "4", "--microbatch", "-1", "--max_steps", "1")
    assert no_micro["train"]["microbatch"] is None
    sample = spec_from("sample", "--model_path", "m.pt", "--use_ddim", "True", "--timestep_respacing", "ddim50")
    assert sample["sample"]["use_ddim"] is True and sample["sample"]["timestep_respacing"] == "ddim50"
    nll = spec_from("evaluate", "--model_path", "m.pt", "--data_dir", "D")
    assert nll["evaluate"]["metrics"] == ["nll"]
    bad = idiff_in_process("spec", "--from-flags", "train", "--learn_sigma", "maybe", check=False)
    assert bad.returncode == 2 and "boolean value expected" in bad.stderr


def test_the_originals_invocation_trains_into_openai_logdir(tmp_path, shapes_dir):
    logdir = tmp_path / "logdir"
    idiff_in_process(
        "train", "--data_dir", shapes_dir, "--image_size", 16, "--num_channels", 32, "--num_res_blocks", 1,
        "--channel_mult", "1,2", "--attention_resolutions", 8, "--learn_sigma", "True", "--diffusion_steps", 40,
        "--batch_size", 4, "--max_steps", 2, "--save_interval", 2, "--sample_grid", 0, "--num_workers", 0,
        env={"OPENAI_LOGDIR": str(logdir)})
    assert (logdir / "checkpoints" / "checkpoint000002.json").exists()
    assert yaml.safe_load((logdir / "spec.yaml").read_text())["model"]["learn_sigma"] is True


def test_help_lists_every_option_with_its_default(capsys):
    for command, at_least in (("train", 40), ("sample", 30), ("evaluate", 30)):
        with_default = [option for option, text in help_options(capsys, command).items() if "default:" in text]
        assert len(with_default) >= at_least, (command, with_default)
    with pytest.raises(SystemExit):
        idiff_main(["--help"])
    listed = re.findall(r"^    ([\w-]+)", capsys.readouterr().out, re.MULTILINE)  # one command a line, indented
    assert {"train", "sample", "evaluate", "validate", "spec", "status", "data", "collect"} <= set(listed), listed


def test_run_dir_defaults_to_openai_logdir_then_runs_name(good, monkeypatch):
    from idiff.jobspec.load import parse_spec

    del good["run_dir"]
    monkeypatch.delenv("OPENAI_LOGDIR", raising=False)
    assert parse_spec(dict(good)).run_dir == os.path.join("runs", "tiny")
    monkeypatch.setenv("OPENAI_LOGDIR", "/tmp/logdir-x")
    assert parse_spec(dict(good)).run_dir == "/tmp/logdir-x"
