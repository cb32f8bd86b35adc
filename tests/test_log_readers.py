"""Every reader of a run dir's logs (``log.jsonl``, ``evals.jsonl``, ``jobs.jsonl``) skips and counts a line of the
wrong shape or type, as it does a torn line: fuzzed with generated lines of valid JSON that are hostile (lists,
strings, numbers, and records whose fields have the wrong type), mixed with good ones.
"""

import json
import random
import warnings
from pathlib import Path

from conftest import tiny_spec

from idiff.cli import main as idiff_main
from idiff.jobspec.load import parse_spec
from idiff.run_dir import CHAIN_EVENT, claim_run_dir
from idiff.train.checkpoint_evaluations import evaluated_steps
from idiff.train.training_log import TrainingLog

INT_WRONG = [True, "4", 4.0, 10**30, [4], {"n": 4}, None]
NUMBER_WRONG = [True, "0.5", 10**400, [0.5], {"v": 0.5}, None]
TEXT_WRONG = [3, True, ["x"], {"x": 1}, None]
STAGE = {"stage": 1, "spec": "t.yaml", "kind": "train", "name": "tiny", "run_dir": "elsewhere", "slurm_job_id": "12"}
LOGS = {  # file: (a good record, {field: values that are never of its type})
    "log.jsonl": ({"step": 3, "loss": 0.5, "images_per_s": 16.0},
                  {"step": INT_WRONG, "loss": NUMBER_WRONG, "images_per_s": NUMBER_WRONG}),
    "evals.jsonl": ({"step": 4, "metrics": {"fid": 12.5}, "job_id": None},
                    {"step": INT_WRONG, "metrics": [[1], "fid", {"fid": "12"}, {"fid": True}, {"fid": 10**400}, None]}),
    "jobs.jsonl": ({"event": "start", "time": "2026-01-01T00:00:00+00:00", "slurm_job_id": "12",
                    "restart_count": 0},
                   {"event": TEXT_WRONG, "time": TEXT_WRONG, "restart_count": INT_WRONG[:-1],
                    "slurm_job_id": [["12"], {"id": 12}, True, 1.5],
                    "slurm_job_ids": [[], "12", [None], [["12"]]], "step": INT_WRONG[:-1],
                    "stages": ["x", [1], [{**STAGE, "stage": "1"}], [{**STAGE, "run_dir": "a\x00b"}],
                               [{k: v for k, v in STAGE.items() if k != "name"}]]}),
}
REQUIRED = {"log.jsonl": ["step"], "evals.jsonl": ["step", "metrics"], "jobs.jsonl": ["event", "time"]}
NOT_RECORDS = [[], [1, 2], "a string", 7, 1.5, True, None, [{"step": 3}]]


def hostile_lines(name: str, rng: random.Random, count: int) -> list[str]:
    """``count`` lines of valid JSON, none of which is a record of ``good``'s shape."""
    good, wrong = LOGS[name]
    lines = []
    for _ in range(count):
        if rng.random() < 0.3:
            lines.append(json.dumps(rng.choice(NOT_RECORDS)))
            continue
        record = dict(good)
        for field in rng.sample(sorted(wrong), rng.randint(1, len(wrong))):
            record[field] = rng.choice(wrong[field])
        if rng.random() < 0.2:
            del record[rng.choice(REQUIRED[name])]
        lines.append(json.dumps(record))
    return lines


def write_log(run_path: Path, name: str, seed: int, good_count=5, bad_count=40) -> int:
    """The file ``name`` of a run dir: good and hostile lines shuffled (and one torn line); returns the bad count."""
    good = LOGS[name][0]
    rng = random.Random(seed)
    goods = [json.dumps({**good, **({"step": good["step"] + i} if "step" in good else {})}) for i in range(good_count)]
    lines = goods + hostile_lines(name, rng, bad_count)
    rng.shuffle(lines)
    (run_path / name).write_text("\n".join(lines) + '\n{"step": 9, "lo\n')
    return bad_count + 1


def skipped(call) -> tuple[object, int]:
    """What ``call()`` returns, and how many lines its warning says it skipped."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    counts = [int(str(w.message).split("skipped ")[1].split()[0]) for w in caught if "skipped" in str(w.message)]
    return result, sum(counts)


def claimed_run(tmp_path):
    return claim_run_dir(parse_spec(tiny_spec(tmp_path / "data", tmp_path / "run"), source="test"))


def test_each_reader_skips_and_counts_hostile_lines(tmp_path):
    run = claimed_run(tmp_path)
    readers = {"log.jsonl": lambda: TrainingLog(run.path).rows(), "evals.jsonl": lambda: evaluated_steps(run.path),
               "jobs.jsonl": lambda: run.history()}
    for seed in range(20):
        for name, read in readers.items():
            bad = write_log(Path(run.path), name, seed)
            records, count = skipped(read)
            assert count == bad, (name, seed)
            assert len(records) == 5, (name, seed)


def test_status_reports_a_run_whose_logs_are_hostile(tmp_path, capsys):
    run = claimed_run(tmp_path)
    for seed in range(10):
        for name in LOGS:
            write_log(Path(run.path), name, seed)
        with open(run.history_file, "a") as f:  # a chain event of good shape among them: the chain is shown
            f.write(json.dumps({"event": CHAIN_EVENT, "time": "t", "stages": [{**STAGE, "run_dir": run.path}]}) + "\n")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert idiff_main(["status", run.path]) == 0, seed
        out = capsys.readouterr()
        assert "chain of 1 jobs" in out.out and "last log: step " in out.out and "evaluations: 5" in out.out, out.out
        assert "Traceback" not in out.err


def test_a_fault_line_naming_a_dump_outside_faults_is_not_read(tmp_path):
    """jobs.jsonl is untrusted: a hang event's ``dump`` that leaves faults/ shows no file's contents."""
    from idiff.ranks.faults import fault_lines

    (tmp_path / "secret.txt").write_text('  File "secret", line 1, in run_job\n')
    run = tmp_path / "run"
    (run / "faults").mkdir(parents=True)
    (run / "faults" / "1-0.txt").write_text('idiff hang\n\n  File "loop.py", line 9, in run_job\n')
    event = {"event": "hang", "time": "t", "rank": 0, "step": 3, "slurm_job_id": None, "restart_count": 0}
    for dump, shown in (("faults/1-0.txt", True), ("../secret.txt", False), ("faults/../../secret.txt", False),
                        (str(tmp_path / "secret.txt"), False)):
        lines = "\n".join(fault_lines(str(run), [{**event, "dump": dump}], 10))
        assert ('File "loop.py"' in lines) is shown and "secret" not in lines.replace(dump, ""), (dump, lines)
