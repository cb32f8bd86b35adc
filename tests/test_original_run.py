"""Continuing a run of the original improved-diffusion: train.resume_checkpoint at its model{S}.pt continues at
step S with the optimizer and EMA files it wrote beside it, as the original's TrainLoop does."""

import json

import pytest
import torch
from conftest import TINY_MODEL, load, tiny_spec, write_spec

import idiff
from idiff.cli import main

STEP = 20
MOMENT, SECOND_MOMENT, EMA_OFFSET = 0.5, 4.0, 1.0


@pytest.fixture
def original_run(tmp_path):
    """A folder as the original's TrainLoop.save leaves it at step 20 with ema_rate 0.9: model000020.pt (a model
    state dict), opt000020.pt (its AdamW's state dict) and ema_0.9_000020.pt (a model-shaped state dict)."""
    folder = tmp_path / "openai-run"
    folder.mkdir()
    model = idiff.create_model_and_diffusion(**TINY_MODEL)[0]
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)  # the original's optimizer
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # the state the original has after its steps: a step count and two moments per parameter
    for moments in opt.state.values():
        moments["step"].fill_(STEP)
        moments["exp_avg"].fill_(MOMENT)
        moments["exp_avg_sq"].fill_(SECOND_MOMENT)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(weights, folder / f"model{STEP:06d}.pt")
    torch.save(opt.state_dict(), folder / f"opt{STEP:06d}.pt")
    torch.save({k: v + EMA_OFFSET for k, v in weights.items()}, folder / f"ema_0.9_{STEP:06d}.pt")
    return folder, weights


def train(tmp_path, shapes_dir, resume, **overrides):
    spec = tiny_spec(shapes_dir, tmp_path / "run", resume_checkpoint=str(resume), **overrides)
    return main(["train", write_spec(tmp_path / "run.yaml", spec)]), tmp_path / "run"


def test_a_run_of_the_original_continues_at_its_step_with_its_optimizer_and_ema(tmp_path, shapes_dir, original_run,
                                                                                  capsys):
    folder, weights = original_run
    lr, anneal = 1e-12, 40  # a negligible rate: the weights stay the original's, to compare with
    code, run_dir = train(tmp_path, shapes_dir, folder / f"model{STEP:06d}.pt", lr=lr, lr_anneal_steps=anneal,
                          max_steps=STEP + 2, save_interval=100)
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    assert (f"train.resume_checkpoint: step {STEP} from model{STEP:06d}.pt, opt{STEP:06d}.pt, "
            f"ema_0.9_{STEP:06d}.pt in {folder}; EMA 0.99 from the model weights") in err
    assert f"start at step {STEP}" in err

    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [STEP + 1, STEP + 2]
    assert [row["lr"] for row in log] == pytest.approx([lr * (1 - STEP / anneal), lr * (1 - (STEP + 1) / anneal)])
    assert log[-1]["images_seen"] == (STEP + 2) * 8
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("checkpoint*.json")) == [f"checkpoint{STEP + 2:06d}.json"]

    # AdamW went on from the loaded state: step counts 20 -> 22, and v = b2^2 v0 + (1 - b2)(b2 g1^2 + g2^2) >= b2^2 v0.
    opt = load(checkpoints / f"opt{STEP + 2:06d}.pt")
    beta2 = opt["param_groups"][0]["betas"][1]
    assert len(opt["state"]) == len(weights)
    for moments in opt["state"].values():
        assert float(moments["step"]) == STEP + 2
        assert moments["exp_avg_sq"].min() >= beta2 ** 2 * SECOND_MOMENT * (1 - 1e-6)

    # EMA 0.9 went on from its file (w + 1: after two updates of unchanged weights, w + 0.81); 0.99 from the weights.
    model = load(checkpoints / f"model{STEP + 2:06d}.pt")
    ema_09 = load(checkpoints / f"ema_0.9_{STEP + 2:06d}.pt")
    ema_099 = load(checkpoints / f"ema_0.99_{STEP + 2:06d}.pt")
    for name, value in weights.items():
        torch.testing.assert_close(model[name], value, atol=1e-6, rtol=0)
        torch.testing.assert_close(ema_09[name], value + 0.9 ** 2 * EMA_OFFSET, atol=1e-5, rtol=0)
        torch.testing.assert_close(ema_099[name], value, atol=1e-6, rtol=0)


def test_an_unreadable_optimizer_file_beside_it_is_refused_naming_it(tmp_path, shapes_dir, original_run, capsys):
    folder, _ = original_run
    (folder / f"opt{STEP:06d}.pt").write_text("not a checkpoint")
    code, _ = train(tmp_path, shapes_dir, folder / f"model{STEP:06d}.pt", max_steps=STEP + 2)
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert f"train.resume_checkpoint: {folder / f'opt{STEP:06d}.pt'} cannot be loaded as a checkpoint" in err
    assert "Traceback" not in err


def test_a_run_that_would_end_before_the_checkpoint_is_refused(tmp_path, shapes_dir, original_run, capsys):
    folder, _ = original_run
    code, _ = train(tmp_path, shapes_dir, folder / f"model{STEP:06d}.pt", max_steps=STEP)
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert f"is at step {STEP}, and this run ends at step {STEP}: raise train.max_steps" in err
