"""One writer per run dir: a job holds the run dir's lease while it writes it; a second job is refused (exit 2,
naming the holder) and a stale lease (its process gone, its heartbeat expired, an earlier run of the same Slurm
job) is taken over with a message. Two processes on this host; across nodes: tests/test_slurm_cluster.py."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import TEST_ENV, idiff_in_process, start_idiff, tiny_spec, write_spec

from idiff import lease
from idiff.errors import UserError

HOLD = """
import sys, time
from idiff.lease import Lease
Lease(sys.argv[1]).take()
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process of this host holding the lease of tmp_path/run."""
    (tmp_path / "run").mkdir()
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE,
                               text=True, env=TEST_ENV)
    assert process.stdout.readline() == "held\n"
    yield process
    process.kill()
    process.wait()


def test_a_second_process_is_refused_naming_the_holder_then_takes_over_once_it_is_gone(tmp_path, holder, capsys):
    run = str(tmp_path / "run")
    with pytest.raises(UserError, match=f"is being written by process {holder.pid} on {socket.gethostname()}"):
        lease.Lease(run).take()
    assert lease.holder_of(run)["pid"] == holder.pid
    holder.send_signal(signal.SIGKILL)  # a node failure: nothing released the lease
    holder.wait()
    mine = lease.Lease(run).take()
    err = capsys.readouterr().err
    assert f"taking over {run}/lease.json from process {holder.pid}" in err
    assert f"process {holder.pid} on this host is gone" in err
    assert lease.holder_of(run)["pid"] == os.getpid()
    mine.release()
    assert not os.path.exists(f"{run}/lease.json") and os.listdir(run) == []


def write_lease(run: Path, **fields) -> None:
    run.mkdir(exist_ok=True)
    holder = {"host": "another-node", "pid": 1, "slurm_job_id": None, "heartbeat": time.time(), "token": "x",
              **fields}
    (run / "lease.json").write_text(json.dumps(holder))


def test_a_lease_of_another_node_holds_while_its_heartbeat_moves(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lease, "EXPIRES_S", 5.0)
    write_lease(tmp_path / "run")
    renew = threading.Timer(1.0, write_lease, [tmp_path / "run"])  # the holder beats: it lives
    renew.start()
    with pytest.raises(UserError, match="process 1 on another-node"):
        lease.Lease(str(tmp_path / "run")).take()
    renew.join()
    assert "cannot be checked from here: waiting up to" in capsys.readouterr().err


def test_a_lease_of_another_node_whose_heartbeat_stops_is_taken_over_once_it_expires(tmp_path, monkeypatch, capsys):
    """As after `docker kill`: the next container has another host name and cannot see the old process."""
    monkeypatch.setattr(lease, "EXPIRES_S", 2.0)
    write_lease(tmp_path / "run")
    started = time.monotonic()
    lease.Lease(str(tmp_path / "run")).take().release()
    assert 1.0 < time.monotonic() - started < 10
    assert "its heartbeat stopped" in capsys.readouterr().err
    write_lease(tmp_path / "run", heartbeat=time.time() - lease.EXPIRES_S - 1)
    lease.Lease(str(tmp_path / "run")).take().release()  # already expired: at once
    assert f"its heartbeat is older than {lease.EXPIRES_S:.0f} s" in capsys.readouterr().err


def test_a_requeued_slurm_job_takes_over_its_own_earlier_lease(tmp_path, monkeypatch, capsys):
    # Held by a live process of this host in Slurm job 4242: the process decides, whatever squeue says of 4242.
    write_lease(tmp_path / "run", host=socket.gethostname(), pid=os.getpid(), slurm_job_id="4242")
    with pytest.raises(UserError, match="Slurm job 4242"):
        lease.Lease(str(tmp_path / "run")).take()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    lease.Lease(str(tmp_path / "run")).take().release()
    assert "it is an earlier run of this Slurm job (requeued)" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["", "{", "[]", '{"host": 1}'])
def test_an_unreadable_lease_is_taken_over(tmp_path, text, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "lease.json").write_text(text)
    lease.Lease(str(tmp_path / "run")).take().release()
    assert "the lease file is unreadable" in capsys.readouterr().err


def test_the_heartbeat_renews_only_a_lease_still_held(tmp_path):
    (tmp_path / "run").mkdir()
    mine = lease.Lease(str(tmp_path / "run"), heartbeat_s=3600).take()
    before = json.loads((tmp_path / "run" / "lease.json").read_text())["heartbeat"]
    assert mine.beat() and json.loads((tmp_path / "run" / "lease.json").read_text())["heartbeat"] >= before
    write_lease(tmp_path / "run")  # taken over by another job meanwhile
    assert not mine.beat()
    mine.release()
    assert (tmp_path / "run" / "lease.json").exists()  # the other job's lease stays


def test_a_second_idiff_train_on_a_running_run_dir_exits_2_naming_the_first(shapes_dir, tmp_path):
    spec = write_spec(tmp_path / "t.yaml", tiny_spec(shapes_dir, tmp_path / "run", max_steps=100000,
                                                     save_interval=100000, log_interval=1))
    first = start_idiff("train", spec)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "log.jsonl").exists():
            assert time.monotonic() < deadline and first.poll() is None, first.communicate()[1][-2000:]
            time.sleep(0.1)
        second = idiff_in_process("train", spec, check=False)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"is being written by process {first.pid} on {socket.gethostname()}" in second.stderr
        assert "end" not in [json.loads(line)["event"] for line in (tmp_path / "run" / "jobs.jsonl").open()]
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert lease.holder_of(str(tmp_path / "run")) is None  # its process is gone: the lease is stale


def test_a_submission_is_refused_while_a_job_writes_the_run_dir(tmp_path, holder, shapes_dir):
    """What idiff-submit and idiff-resume do before submitting: claim the run dir without holding it."""
    from idiff.jobspec.load import parse_spec
    from idiff.run_dir import claim_run_dir

    spec = parse_spec(tiny_spec(shapes_dir, tmp_path / "run"), source="test")
    with pytest.raises(UserError, match=f"is being written by process {holder.pid}"):
        claim_run_dir(spec)
    assert os.listdir(tmp_path / "run") == ["lease.json"]  # nothing written
