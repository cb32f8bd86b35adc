"""``idiff status``: progress, throughput and ETA from the log's tail, checkpoints without hashing them (unless
--verify), the stages of a chain, and --watch. The Slurm states of real jobs: tests/test_cluster.py."""

import json

from conftest import tiny_spec

from idiff.checkpoints import manifest_name
from idiff.cli import main as idiff_main
from idiff.jobspec.load import parse_spec
from idiff.run_dir import CHAIN_EVENT, claim_run_dir

UNKNOWN_JOB = "987654321"  # neither squeue nor sacct knows it


def fake_run(tmp_path, name="train", checkpoints=(), rows=()):
    """A claimed run dir of a tiny 12-step run with ``checkpoints`` whose files have the sizes, but not the
    hashes, that their manifests give, and log rows."""
    spec = parse_spec(tiny_spec(tmp_path / "data", tmp_path / name), source="test")
    run = claim_run_dir(spec)
    folder = tmp_path / name / "checkpoints"
    folder.mkdir()
    for step in checkpoints:
        names = [f"{kind}{step:06d}.pt" for kind in ("model", "opt", "state")]
        for file in names:
            (folder / file).write_bytes(b"x")
        files = {file: {"size": 1, "sha256": "0" * 64} for file in names}
        (folder / manifest_name(step)).write_text(json.dumps({"step": step, "files": files, "images_seen": 8 * step}))
    with open(tmp_path / name / "log.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return run


def status(capsys, *args) -> str:
    assert idiff_main(["status", *map(str, args)]) == 0
    return capsys.readouterr().out


def test_progress_throughput_and_eta_from_the_last_log_row(capsys, tmp_path):
    run = fake_run(tmp_path, rows=[{"step": s, "loss": 0.5, "images_per_s": 16.0} for s in range(1, 7)])
    out = status(capsys, run.path)
    # 6 of 12 steps; 6 steps x 8 images at 16 img/s: 3 s left
    assert "last log: step 6/12 (50.0%), loss 0.50000, 16 img/s over the last 1 steps, eta 0:00:03" in out


def test_many_checkpoints_are_not_hashed_unless_verify(capsys, tmp_path):
    run = fake_run(tmp_path, checkpoints=range(4, 4001, 4))
    out = status(capsys, run.path)
    assert "last complete checkpoint: step 4000, 32000 images seen, 1000 kept (file sizes checked" in out
    assert "corrupt" not in out
    (tmp_path / "train" / "checkpoints" / "opt004000.pt").write_bytes(b"a different size")
    out = status(capsys, run.path)
    assert "last complete checkpoint: step 3996" in out and "incomplete or corrupt checkpoints: 4000" in out
    verified = status(capsys, run.path, "--verify")
    assert "checkpoints: none complete" in verified and "incomplete or corrupt checkpoints: 4, 8, 12" in verified


def test_a_stage_of_a_chain_shows_the_whole_chain(capsys, tmp_path):
    train = fake_run(tmp_path, "train", checkpoints=[4], rows=[{"step": 4, "images_per_s": 8.0}])
    stages = [{"stage": 1, "spec": "train.yaml", "kind": "train", "name": "tiny", "run_dir": train.path,
               "slurm_job_id": UNKNOWN_JOB},
              {"stage": 2, "spec": "sample.yaml", "kind": "sample", "name": "samples",
               "run_dir": str(tmp_path / "samples"), "slurm_job_id": UNKNOWN_JOB + "1"}]
    train.record(CHAIN_EVENT, stage=1, stages=stages)
    out = status(capsys, train.path, "--watch", "0.1")  # every job is over: one print, then it returns
    lines = out.splitlines()
    assert lines[0] == "chain of 2 jobs: finished"
    assert lines[1] == f"stage 1: train tiny in {train.path}; slurm job {UNKNOWN_JOB}: finished, 0 restart(s)"
    assert "  last log: step 4/12 (33.3%), 8 img/s over the last 1 steps, eta 0:00:08" in lines[2]
    assert f"stage 2: sample samples in {tmp_path / 'samples'}; slurm job {UNKNOWN_JOB}1: finished" in out


def test_not_a_run_dir_is_exit_2(capsys, tmp_path):
    assert idiff_main(["status", str(tmp_path)]) == 2
    assert "not a run dir" in capsys.readouterr().err
