"""The training state, saved and restored in one call each way.

As torchtitan's Stateful parts and EDM2's CheckpointIO: each part (model, EMA, optimizer, timestep sampler,
loss scaler, data position, non-finite count) has state_dict / load_state_dict, and TrainState maps them onto
the original's files, model{S}.pt, ema_{rate}_{S}.pt and opt{S}.pt, plus state{S}.pt (the other parts) and the
manifest that makes them count (idiff/checkpoints.py).

No part is per rank: every random draw is keyed (train/inputs.py), so rank 0's files restore every rank.
Checkpoints of earlier idiff versions also hold per-rank RNG states, which are ignored.
"""

import sys
import time
import warnings

import torch
import torch.distributed as dist

from .. import storage
from ..checkpoints import BackgroundWriter, CheckpointStore, checkpoint_files, step_of
from ..errors import RunFailed, UserError
from ..ranks.signals import any_rank
from ..weights import load_optimizer_state, load_weights, read_weights

RESUME_FIELD = "train.resume_checkpoint"


class TrainState:
    """Everything that makes step ``step + 1`` what it is. ``ema`` is None except on rank 0."""

    def __init__(self, *, spec, env, model, opt, ema, timestep_sampler, scaler, loader, nonfinite):
        self.spec, self.env = spec, env
        self.model, self.opt, self.ema = model, opt, ema
        self.timestep_sampler, self.scaler, self.loader, self.nonfinite = timestep_sampler, scaler, loader, nonfinite
        self.step = 0

    @property
    def images_seen(self) -> int:
        return self.step * self.spec.train.batch_size

    def state_dict(self) -> dict[str, object]:
        """File name -> its content as CPU objects, for checkpoint ``step`` (rank 0: it holds the EMA)."""
        files = checkpoint_files(self.step, self.spec.train.ema_rates)
        rest = {"step": self.step, "images_seen": self.images_seen, "world_size": self.env.world_size,
                "run_hash": self.spec.run_hash(), "schedule_sampler": self.timestep_sampler.state_dict(),
                "data": self.loader.state_dict(), "grad_scaler": self.scaler.state_dict(),
                **self.nonfinite.state_dict()}
        payloads = {files["model"]: _cpu(self.model.state_dict()), files["opt"]: _cpu(self.opt.state_dict()),
                    files["state"]: rest}
        payloads.update({files[f"ema_{rate}"]: self.ema.state_dict(rate) for rate in self.ema.rates})
        return payloads

    def manifest_fields(self) -> dict:
        return {"run_hash": self.spec.run_hash(), "images_seen": self.images_seen}

    def load(self, store: CheckpointStore, step: int) -> None:
        """Everything of checkpoint ``step`` of this spec: the run continues exactly where it stopped."""
        files = checkpoint_files(step, self.spec.train.ema_rates)
        rest = store.load(files["state"])
        if rest["run_hash"] not in self.spec.run_hashes():
            raise UserError(f"{store.manifest_path(step)} belongs to another spec (run hash {rest['run_hash']}); "
                            f"use another run_dir, or resume_checkpoint to start a new run from its weights")
        self.model.load_state_dict(store.load(files["model"]))
        self.opt.load_state_dict(store.load(files["opt"]))
        if self.ema is not None:
            for rate in self.ema.rates:
                self.ema.load_state_dict(rate, store.load(files[f"ema_{rate}"]))
        self.timestep_sampler.load_state_dict(rest["schedule_sampler"])
        self.scaler.load_state_dict(rest["grad_scaler"])
        self.loader.load_state_dict(rest["data"])
        self.nonfinite.load_state_dict(rest)
        self.step = step
        if rest["world_size"] != self.env.world_size and self.spec.model.dropout > 0:
            warnings.warn(f"resuming on {self.env.world_size} ranks (was {rest['world_size']}): dropout masks will "
                          f"differ from an uninterrupted run", stacklevel=2)

    def continue_from(self, path: str) -> None:
        """``train.resume_checkpoint``, as the original reads it.

        ``model{S}.pt`` continues at step S with ``opt{S}.pt`` and ``ema_{rate}_{S}.pt`` from its folder when
        they are there (an EMA without its file starts from the model weights); a complete idiff checkpoint of
        this same spec resumes exactly. A file without a step in its name (a released .pt) fine-tunes from
        step 0 with a fresh optimizer. The data stream, timestep sampler and loss scale start afresh.
        """
        folder, name = path.rsplit("/", 1) if "/" in path else (".", path)
        step = step_of(name) if name.startswith("model") else None
        sibling = CheckpointStore(folder)
        files = checkpoint_files(step or 0, self.spec.train.ema_rates)
        if step is not None and step in sibling.steps() and sibling.problem(step) is None \
                and sibling.load(files["state"])["run_hash"] in self.spec.run_hashes():
            self.load(sibling, step)
            self._say(f"{RESUME_FIELD}: resuming checkpoint {step} of this same spec in {folder} exactly")
            return
        if (step or 0) >= self.spec.train.total_steps:
            raise UserError(f"{RESUME_FIELD}: {path} is at step {step}, and this run ends at step "
                            f"{self.spec.train.total_steps}: raise train.max_steps")
        load_weights(self.model, path, RESUME_FIELD)
        self.step, loaded, fresh = step or 0, [name], []
        if step is not None and storage.exists(sibling.path(files["opt"])):
            load_optimizer_state(self.opt, sibling.path(files["opt"]), RESUME_FIELD)
            loaded.append(files["opt"])
        else:
            fresh.append("a fresh optimizer state")
        for rate in self.ema.rates if self.ema is not None else ():
            ema_path = sibling.path(files[f"ema_{rate}"])
            if step is not None and storage.exists(ema_path):
                self.ema.load_state_dict(rate, read_weights(self.model, ema_path, RESUME_FIELD))
                loaded.append(files[f"ema_{rate}"])
            else:
                self.ema.load_state_dict(rate, dict(self.model.named_parameters()))
                fresh.append(f"EMA {rate} from the model weights")
        self._say(f"{RESUME_FIELD}: step {self.step} from {', '.join(loaded)} in {folder}"
                  + (f"; {', '.join(fresh)}" if fresh else ""))

    def _say(self, line: str) -> None:
        if self.env.is_main:
            print(f"idiff: {line}", file=sys.stderr, flush=True)


def restore(state: TrainState, store: CheckpointStore) -> None:
    """The newest complete checkpoint in the run dir (the run continues exactly), else
    ``train.resume_checkpoint``, else a fresh start at step 0."""
    step, env = None, state.env
    if env.is_main:
        store.remove_stale_temporaries()
        step = store.latest_complete()
    if env.world_size > 1:
        box = [step]
        dist.broadcast_object_list(box, src=0)
        step = box[0]
    if step is not None:
        state.load(store, step)
    elif state.spec.train.resume_checkpoint:
        state.continue_from(state.spec.train.resume_checkpoint)


class Checkpoints:
    """Where the training state goes: rank 0 writes it in the background (training does not wait on storage)
    and prunes old checkpoints; a failed write stops every rank.

    ``on_complete(step)`` runs on rank 0, in the training thread, for each checkpoint whose manifest is
    written: at the first step boundary after its background write ended (``announce``), or when a save waits.
    """

    def __init__(self, store: CheckpointStore, *, is_main: bool, keep_last, keep_every, on_complete):
        self.store, self.on_complete = store, on_complete
        self.keep_last, self.keep_every = keep_last, keep_every
        self.writer = BackgroundWriter(store) if is_main else None
        self.seconds = 0.0  # the training thread's time in saves and waits for the writer (EDM2's maintenance)

    def save(self, state: TrainState, *, wait: bool = False) -> None:
        """Checkpoint ``state.step``; ``wait``: until it is complete (before the job ends or is requeued)."""
        self.wait()
        started = time.monotonic()
        if self.writer is not None:
            self.writer.submit(state.step, state.state_dict(), state.manifest_fields(),
                               after=lambda: self.store.prune(self.keep_last, self.keep_every))
        self.seconds += time.monotonic() - started
        if wait:
            self.wait()

    def wait(self) -> None:
        """Until rank 0's write is done; one that failed (a full disk) stops every rank, exit 1. A collective."""
        started = time.monotonic()
        try:
            self._wait()
        finally:
            self.seconds += time.monotonic() - started

    def _wait(self) -> None:
        failure = None
        if self.writer is not None:
            try:
                self.writer.wait()
            except (RunFailed, OSError) as err:  # OSError: pruning the old checkpoints failed
                failure = err
        if any_rank(failure is not None):
            raise failure or RunFailed("rank 0 could not write a checkpoint; its message says why")
        self.announce()

    def announce(self) -> None:
        """``on_complete`` for the checkpoints completed since the last call; never blocks."""
        if self.writer is not None:
            for step in self.writer.completed():
                self.on_complete(step)

    def last_good(self) -> str | None:
        """The manifest of the newest complete checkpoint, once rank 0's write in progress has ended."""
        if self.writer is not None:
            self.writer.wait()
        good = self.store.latest_complete()
        return self.store.manifest_path(good) if good is not None else None


def _cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj
