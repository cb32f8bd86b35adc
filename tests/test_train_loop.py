"""The training loop's parts: microbatching, precision, divergence, EMA, checkpoints, logs."""

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL, load, tiny_spec, write_spec
from conftest import idiff as run_idiff

import idiff
from idiff.checkpoints import CheckpointStore
from idiff.jobspec.load import parse_spec
from idiff.launch.hooks import JobHooks
from idiff.ranks.env import RankEnv
from idiff.train.ema import EMA
from idiff.train.inputs import StepInputs
from idiff.train.loop import train
from idiff.train.optim import accumulate_gradients


def test_microbatches_give_the_full_batch_gradient():
    torch.manual_seed(0)
    model, diffusion = idiff.create_model_and_diffusion(**TINY_MODEL, diffusion_steps=50, noise_schedule="cosine")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    t = torch.randint(0, 50, (8,))
    noise = torch.randn_like(x)
    weights = torch.rand(8) + 0.5  # importance weights take part in the normalisation
    grads = {}
    for microbatch in (8, 2, 3):
        model.zero_grad()
        losses = accumulate_gradients(model, diffusion, StepInputs(x, t, noise, weights, {}), microbatch=microbatch)
        assert losses.shape == (8,)
        grads[microbatch] = [p.grad.clone() for p in model.parameters()]
    for microbatch in (2, 3):
        for full, micro in zip(grads[8], grads[microbatch]):
            torch.testing.assert_close(micro, full, atol=1e-6, rtol=0)


def test_ema_is_a_float32_moving_average_per_rate():
    model = torch.nn.Linear(2, 1).to(torch.bfloat16)
    ema = EMA(model, [0.5, 0.9])
    start = model.weight.detach().float().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert ema.shadows[0.5][0].dtype == torch.float32
    torch.testing.assert_close(ema.state_dict(0.5)["weight"], start + 0.5)
    torch.testing.assert_close(ema.state_dict(0.9)["weight"], start + 0.1)


def run(tmp_path, shapes_dir, name="run", check=True, **train):
    spec = tiny_spec(shapes_dir, tmp_path / name, **train)
    result = run_idiff("train", write_spec(tmp_path / f"{name}.yaml", spec), check=check)
    return result, tmp_path / name


def rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]


def test_logs_pictures_status_and_the_checkpoint_layout(tmp_path, shapes_dir):
    _, run_dir = run(tmp_path, shapes_dir, max_steps=8, save_interval=4, sample_grid=4, sample_grid_steps=3,
                     schedule_sampler="loss-second-moment", lr_anneal_steps=8)
    log = rows(run_dir)
    assert [r["step"] for r in log] == list(range(1, 9))
    for key in ("loss", "mse", "vb", "loss_q0", "grad_norm", "lr", "loss_scale", "images_per_s", "step_time_s",
                "images_seen"):
        assert key in log[-1]
    assert [r["lr"] for r in log[:3]] == pytest.approx([1e-4, 1e-4 * 7 / 8, 1e-4 * 6 / 8])  # linear anneal
    assert log[-1]["images_seen"] == 64
    header = (run_dir / "progress.csv").read_text().splitlines()[0].split(",")
    assert "loss_q3" in header and "images_per_s" in header
    for png in ("samples_000004.png", "samples_000008.png", "loss.png"):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG"
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == sorted(f"{kind}{step:06d}.{ext}" for step in (4, 8) for kind, ext in
                           [("model", "pt"), ("opt", "pt"), ("state", "pt"), ("ema_0.9_", "pt"),
                            ("ema_0.99_", "pt"), ("checkpoint", "json")])
    state = load(run_dir / "checkpoints" / "state000008.pt")
    assert state["step"] == 8 and state["images_seen"] == 64 and state["data"]["position"] == 64
    assert state["schedule_sampler"]["loss_counts"].sum() == 64  # every example's loss was recorded
    assert "rng" not in state  # dropout is reseeded from (seed, rank, step) at each step: no generator state
    model = idiff.create_model_and_diffusion(**TINY_MODEL)[0]
    model.load_state_dict(load(run_dir / "checkpoints" / "ema_0.99_000008.pt"))  # a plain model state dict
    status = run_idiff("status", run_dir).stdout
    assert "last complete checkpoint: step 8, 64 images seen" in status
    assert "start" in status and "status=completed" in status


def test_fp16_keeps_its_grad_scaler_state_and_bf16_runs(tmp_path, shapes_dir):
    _, fp16 = run(tmp_path, shapes_dir, "fp16", precision="fp16", max_steps=2, save_interval=2)
    scaler = load(fp16 / "checkpoints" / "state000002.pt")["grad_scaler"]
    assert scaler["scale"] > 0 and "_growth_tracker" in scaler
    assert rows(fp16)[-1]["loss_scale"] == scaler["scale"]
    result, bf16 = run(tmp_path, shapes_dir, "bf16", precision="bf16", max_steps=2, save_interval=2, microbatch="auto")
    assert "microbatch 8" in result.stderr  # 'auto' on a CPU: the whole rank batch
    assert all(r["loss"] == r["loss"] for r in rows(bf16))  # finite


def test_divergence_stops_with_the_last_good_checkpoint(tmp_path, shapes_dir):
    result, run_dir = run(tmp_path, shapes_dir, check=False, lr=1e30, max_steps=30, save_interval=1,
                          max_nonfinite_steps=3)
    assert result.returncode == 1
    assert "non-finite steps in a row" in result.stderr and "last good checkpoint" in result.stderr
    store = CheckpointStore(run_dir / "checkpoints")
    good = store.latest_complete()
    assert good is not None and good < 30
    assert str(store.manifest_path(good)) in result.stderr


def test_pruning_keeps_the_newest_and_every_kth(tmp_path, shapes_dir):
    _, run_dir = run(tmp_path, shapes_dir, max_steps=12, save_interval=2, keep_last=2, keep_every=4)
    assert CheckpointStore(run_dir / "checkpoints").steps() == [4, 8, 10, 12]
    assert not list((run_dir / "checkpoints").glob("*000006*"))


def test_resume_checkpoint_with_released_weights_fine_tunes_from_step_0(tmp_path, shapes_dir):
    released = tmp_path / "released.pt"
    model = idiff.create_model_and_diffusion(**TINY_MODEL)[0]
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    torch.save(model.state_dict(), released)
    result, run_dir = run(tmp_path, shapes_dir, resume_checkpoint=str(released), lr=1e-12, max_steps=2,
                          save_interval=2)
    assert "start at step 0" in result.stderr
    tuned = load(run_dir / "checkpoints" / "model000002.pt")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(tuned[name], value, atol=1e-6, rtol=0)
    assert load(run_dir / "checkpoints" / "opt000002.pt")["state"][0]["step"] == 2  # fresh optimizer


def test_checkpoint_written_hears_of_each_checkpoint_once_it_is_complete(tmp_path, shapes_dir):
    spec = parse_spec(tiny_spec(shapes_dir, tmp_path / "run", max_steps=6, save_interval=2, num_workers=0))
    store = CheckpointStore(tmp_path / "run" / "checkpoints")
    heard = []

    class Recording(JobHooks):
        def checkpoint_written(self, step):
            heard.append((step, store.problem(step)))  # None: every file is there and matches the manifest

    assert train(spec, RankEnv(), Recording(spec, RankEnv())) == "completed"
    assert heard == [(2, None), (4, None), (6, None)]
