"""Shared fixtures: a tiny synthetic dataset, tiny specs, and running the real ``idiff`` command."""

import contextlib
import copy
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from idiff.cli import main as idiff_main
from idiff.data.prepare import synthetic

IN_CI = os.environ.get("CI", "").lower() == "true"
TEST_ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def require_service(problem: str | None) -> None:
    """Skip, printing ``problem``, on a machine that lacks a service; under CI=true that is a failure
    (.ci/run installs and starts what the tests need)."""
    if problem is None:
        return
    if IN_CI:
        pytest.fail(f"CI=true, so this must be available: {problem}", pytrace=False)
    pytest.skip(problem)


TEST_IMAGE = os.environ.get("IDIFF_TEST_IMAGE", "idiff")  # .ci/run builds idiff:ci and names it here


def docker_problem() -> str | None:
    """Why the image of docker/Dockerfile cannot be run here (the daemon named by DOCKER_HOST, or the
    default one), or None."""
    if shutil.which("docker") is None:
        return "docker not found: no Docker here (.ci/docker.sh installs and starts one)"
    try:
        daemon = subprocess.run(["docker", "version", "-f", "{{.Server.Version}}"], capture_output=True, text=True,
                                timeout=60)
        if daemon.returncode != 0:
            return f"no Docker daemon answers (DOCKER_HOST={os.environ.get('DOCKER_HOST', 'unset')}): " \
                   f"{daemon.stderr.strip()[:200]}"
        image = subprocess.run(["docker", "image", "inspect", TEST_IMAGE], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "the Docker daemon did not answer within 60 s"
    if image.returncode != 0:
        return (f"image {TEST_IMAGE} not found: docker build -f docker/Dockerfile -t {TEST_IMAGE} . "
                "(or name another in IDIFF_TEST_IMAGE)")
    return None


SLURM_NODES = ("n1", "n2")


def slurm_cluster_problem() -> str | None:
    """Why the local two-node cluster of slurm/start-cluster.sh cannot be used, or None."""
    if shutil.which("sinfo") is None:
        return "sinfo not found: no Slurm here (start one with: sudo bash slurm/start-cluster.sh)"
    try:
        result = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 30 s: is slurmctld running?"
    if result.returncode != 0:
        return f"sinfo failed, is slurmctld running? ({result.stderr.strip()})"
    states = dict(line.split()[:2] for line in result.stdout.splitlines() if len(line.split()) >= 2)
    missing = [node for node in SLURM_NODES if node not in states]
    if missing:
        return f"nodes {missing} not in this cluster: run slurm/start-cluster.sh"
    # comp: the node is finishing a job (right after a test's scancel), and up
    down = [node for node in SLURM_NODES if states[node].rstrip("*~#") not in ("idle", "mix", "alloc", "comp")]
    return f"nodes {down} are not up: run slurm/start-cluster.sh" if down else None


AZURITE = Path(__file__).resolve().parents[1] / "objectstore"  # azurite.sh and containers.py


def objectstore_problem() -> str | None:
    """Why no Azure Blob store (the Azurite emulator of objectstore/azurite.sh) answers az:// paths here, or None."""
    account = os.environ.get("AZURE_STORAGE_ACCOUNT")
    if not account or not os.environ.get("AZURE_STORAGE_KEY"):
        return ("AZURE_STORAGE_ACCOUNT / AZURE_STORAGE_KEY unset: no object store here (sudo bash "
                "objectstore/azurite.sh start prints them)")
    host = f"{account}.blob.core.windows.net"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as err:
        return f"{host}:443 does not answer ({err}): start the emulator with sudo bash objectstore/azurite.sh start"
    return None


@pytest.fixture
def store_root():
    """A container of its own on the emulator, for one test: ``az://ACCOUNT/CONTAINER``, deleted afterwards
    (blobfile cannot create a container, objectstore/containers.py can)."""
    require_service(objectstore_problem())
    container = f"test-{uuid.uuid4().hex[:12]}"
    subprocess.run([sys.executable, AZURITE / "containers.py", container], check=True, capture_output=True, timeout=60)
    yield f"az://{os.environ['AZURE_STORAGE_ACCOUNT']}/{container}"
    subprocess.run([sys.executable, AZURITE / "containers.py", container, "--delete"], capture_output=True,
                   timeout=60)


@pytest.fixture(scope="session", autouse=True)
def reference_statistics_cache(tmp_path_factory):
    """Evaluations cache reference statistics in the session's own folder, never in the user's ~/.cache."""
    folder = str(tmp_path_factory.mktemp("idiff-cache"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IDIFF_CACHE_DIR", folder)
        patch.setitem(TEST_ENV, "IDIFF_CACHE_DIR", folder)
        yield folder


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> str:
    """64 labelled 16px images, made by ``idiff data synthetic``'s code."""
    out = tmp_path_factory.mktemp("data") / "shapes"
    synthetic(str(out), n=64, image_size=16, classes=2, seed=0)
    return str(out)


NUM_IMAGES = 4  # the fewest precision/recall takes: every image costs an Inception pass at 299 px


def require_eval_extra():
    """FID, IS and precision/recall need the eval extra; NLL and collecting this module do not."""
    return pytest.importorskip("torch_fidelity", reason="needs the eval extra: pip install .[eval]")


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """A randomly initialised Inception state dict in a file: no download, the real loading path.

    He-initialised so that features keep their scale through 90-odd layers (PyTorch's default init
    shrinks them to ~1e-8, where FID drowns in rounding).
    """
    require_eval_extra()
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _UnloadedInception(FeatureExtractorInceptionV3):
        """torch-fidelity's Inception with its weight loading skipped, for weights made up here."""

        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    folder = tmp_path_factory.mktemp("inception")
    empty = folder / "empty.pth"
    torch.save({}, empty)
    torch.manual_seed(0)
    network = _UnloadedInception("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    for module in network.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = folder / "inception.pth"
    torch.save(network.state_dict(), path)
    return str(path)


@pytest.fixture(scope="session")
def images(shapes_dir, tmp_path_factory):
    """The first shapes as a reference batch and folder, the same as a sample run dir, and noisier copies."""
    folder = tmp_path_factory.mktemp("images")
    files = sorted(Path(shapes_dir).glob("*.png"))[:NUM_IMAGES]
    clean = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    paths = {"reference": folder / "reference.npz", "sample_run": folder / "sample-run",
             "reference_folder": folder / "reference"}
    paths["reference_folder"].mkdir()
    for f in files:
        shutil.copy(f, paths["reference_folder"])
    np.savez(paths["reference"], arr_0=clean)
    paths["sample_run"].mkdir()
    np.savez(paths["sample_run"] / f"samples_{NUM_IMAGES}x16x16x3.npz", arr_0=clean)
    noise = np.random.default_rng(0).normal(size=clean.shape)
    for sigma in (16, 48):
        paths[sigma] = folder / f"noisy-{sigma}.npz"
        np.savez(paths[sigma], arr_0=(clean + sigma * noise).round().clip(0, 255).astype(np.uint8))
    paths["small"], paths["few"] = folder / "small.npz", folder / "few.npz"
    np.savez(paths["small"], arr_0=clean[:, ::2, ::2])
    np.savez(paths["few"], arr_0=clean[:3])
    return {name: str(path) for name, path in paths.items()}


NUM_CLASSES = 2  # shapes_dir's classes

TINY_MODEL = {"image_size": 16, "num_channels": 32, "num_res_blocks": 1, "attention_resolutions": "8",
              "channel_mult": "1,2", "learn_sigma": True}


def tiny_spec(data_dir, run_dir, **train) -> dict:
    """A train spec of a 0.76M-parameter model that runs a step in ~50 ms on the CPU."""
    return {
        "kind": "train", "name": "tiny", "run_dir": str(run_dir), "model": dict(TINY_MODEL),
        "diffusion": {"diffusion_steps": 50, "noise_schedule": "cosine"},
        "train": {"data_dir": str(data_dir), "batch_size": 8, "max_steps": 12, "save_interval": 4, "log_interval": 1,
                  "num_workers": 1, "sample_grid": 0, "deterministic": True, "ema_rate": "0.9,0.99", **train},
    }


@pytest.fixture(scope="session")
def trained_run(shapes_dir, tmp_path_factory) -> dict:
    """A class-conditional tiny model, trained once for the whole session: checkpoints at steps 2 and 4,
    EMA rates 0.9 and 0.99. Tests read it and never write into it."""
    root = tmp_path_factory.mktemp("trained")
    spec = tiny_spec(shapes_dir, root / "train", max_steps=4, save_interval=2)
    spec["model"].update(class_cond=True, num_classes=NUM_CLASSES)
    idiff_in_process("train", write_spec(root / "train.yaml", spec))
    return {"spec": spec, "run": root / "train"}


@pytest.fixture(scope="module")
def trained(trained_run, tmp_path_factory) -> dict:
    """The session's trained run, and a folder of this module's own (``root``) for the jobs it starts from it."""
    return {**copy.deepcopy(trained_run), "root": tmp_path_factory.mktemp("from-trained")}


def assert_refused(kind, spec_path, run_dir, messages, *args, env=None) -> str:
    """``idiff KIND SPEC ARGS`` exits 2 with ``messages`` and no traceback, before ``run_dir`` (unless
    None) exists; returns what it printed. In this process: refusals need no interpreter of their own."""
    result = idiff_in_process(kind, spec_path, *args, check=False, env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    for message in messages:
        assert message in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert run_dir is None or not Path(run_dir).exists()
    return result.stderr


def write_spec(path, spec: dict) -> str:
    Path(path).write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


@contextlib.contextmanager
def torch_globals_restored():
    """A job sets what is global to its process (the thread count, deterministic algorithms, the seed of
    the default generator); run in the test process, it must leave them as the next test expects."""
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def idiff_in_process(*args, check=True, env=None) -> subprocess.CompletedProcess:
    """``idiff ARGS`` through ``idiff.cli.main`` in this process, with ``env`` set meanwhile: what it printed
    and its exit code, as :func:`idiff` returns them, without starting Python and importing torch again.
    An exception other than the user errors main turns into messages fails the test with its traceback.
    (Ranks that ``--nproc`` starts are processes of their own: their output is not in the result.)"""
    argv = [str(arg) for arg in args]
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            torch_globals_restored():
        for name, value in (env or {}).items():
            patch.setenv(name, value)
        try:
            code = idiff_main(argv)
        except SystemExit as done:  # argparse's --help and usage errors
            code = done.code
    if check and code != 0:
        raise AssertionError(f"idiff {' '.join(argv)} exited {code}\n{err.getvalue()[-4000:]}")
    return subprocess.CompletedProcess(["idiff", *argv], code, out.getvalue(), err.getvalue())


def idiff(*args, check=True, timeout=300, env=None, **kwargs) -> subprocess.CompletedProcess:
    """Run the real command line in a fresh process: for what only a process shows (signals, exit
    codes of the interpreter, tracebacks, output of every rank)."""
    result = subprocess.run([sys.executable, "-m", "idiff.cli", *map(str, args)], capture_output=True, text=True,
                            timeout=timeout, env={**TEST_ENV, **(env or {})}, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"idiff {' '.join(map(str, args))} exited {result.returncode}\n{result.stderr[-4000:]}")
    return result


def start_idiff(*args, env=None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "idiff.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**TEST_ENV, **(env or {})},
                            start_new_session=True, **kwargs)


def load(path):
    return torch.load(path, weights_only=True)


def assert_same_tensors(a, b, exact=True, atol=0.0):
    """Equal nested dicts/lists of tensors: bitwise, or within ``atol``."""
    if isinstance(a, torch.Tensor):
        if exact:
            assert torch.equal(a, b), f"differ by {(a.double() - b.double()).abs().max().item():.3g}"
        else:
            torch.testing.assert_close(a, b, atol=atol, rtol=0)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_tensors(a[k], b[k], exact, atol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tensors(x, y, exact, atol)
    else:
        assert a == b


def assert_same_function(files_a, files_b, atol=1e-5):
    """The model and EMA weights of two runs compute the same function, to float rounding.

    Raw weights are the wrong yardstick across world sizes: a bias that the next GroupNorm cancels
    gets only rounding noise as gradient, which Adam normalises into full-size random steps.
    """
    import idiff as package

    model = package.create_model_and_diffusion(**TINY_MODEL)[0].eval()
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 3, 16, 16, generator=gen), torch.tensor([1.0, 100.0, 500.0, 900.0])
    for name in files_a:
        if name.startswith(("model", "ema")):
            outputs = []
            for files in (files_a, files_b):
                model.load_state_dict(files[name])
                with torch.no_grad():
                    outputs.append(model(x, t))
            torch.testing.assert_close(outputs[0], outputs[1], atol=atol, rtol=0, msg=name)


def final_files(run_dir, step, rates=("0.9", "0.99")):
    folder = Path(run_dir) / "checkpoints"
    names = [f"model{step:06d}.pt", f"opt{step:06d}.pt", *[f"ema_{r}_{step:06d}.pt" for r in rates]]
    return {name: load(folder / name) for name in names}


def wait_for_step(run_dir, step: int, timeout=120) -> None:
    """Until the run's log.jsonl has reached ``step`` (a line still being written is read again)."""
    deadline = time.monotonic() + timeout
    log = Path(run_dir) / "log.jsonl"
    while time.monotonic() < deadline:
        lines = log.read_text().splitlines() if log.exists() else []
        try:
            if lines and json.loads(lines[-1])["step"] >= step:
                return
        except json.JSONDecodeError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{run_dir} never reached step {step}")


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst
