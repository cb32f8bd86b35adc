"""The training loop: DDP, microbatches, mixed precision, EMA, checkpoints, exact resume.

Nothing random carries over from one step to the next: noise and timesteps come from (seed, step, global
sample index), data order from (seed, epoch), dropout from (seed, rank, step) (train/inputs.py). So an
interrupted and resumed run equals an uninterrupted one bit for bit, and the same global batch is drawn
whatever the world size. What a checkpoint holds is train/state.py's TrainState.
"""

import json
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .. import rng, storage
from ..checkpoints import CheckpointStore
from ..data import ShardedLoader, open_images
from ..diffusion.timestep_sampler import LossAwareSampler, create_named_schedule_sampler
from ..errors import UserError
from ..factory import model_and_diffusion
from ..precision import autocast
from ..progress import Progress
from ..ranks.batch import choose_microbatch, per_rank_batch
from ..ranks.env import RankEnv
from ..ranks.signals import any_rank
from ..weights import load_weights
from .divergence import NonfiniteSteps
from .ema import EMA
from .inputs import draw_inputs, feed_timestep_sampler, reseed_dropout
from .memory import memory_probe
from .optim import accumulate_gradients, apply_gradients, learning_rate, make_optimizer, set_learning_rate
from .preview import write_pictures
from .state import Checkpoints, TrainState, restore
from .training_log import StepStats, TrainingLog

COMPLETED, PREEMPTED = "completed", "preempted"


@dataclass
class Training:
    """What the loop works with, made once per start by ``setup``: the training state (what a checkpoint holds)
    and the rest that each start builds afresh."""

    spec: object  # the TrainJob
    env: RankEnv
    run_dir: object  # RunDir
    dataset: object  # the training images (folder or packed)
    diffusion: object
    state: TrainState
    checkpoints: Checkpoints
    forward: torch.nn.Module  # the model under DDP (and torch.compile), for the forward passes
    rank_batch: int  # images per rank per step
    microbatch: int  # images per forward/backward
    log: TrainingLog | None  # rank 0's
    stats: StepStats
    progress: Progress
    mixed: object  # the autocast context of train.precision

    def optimizer_step(self, batch) -> None:
        """One optimizer step on the global batch (this rank's slice of it)."""
        spec, env, state, cfg = self.spec, self.env, self.state, self.spec.train
        step = state.step
        inputs = draw_inputs(batch, spec=spec, timestep_sampler=state.timestep_sampler, step=step, rank=env.rank,
                             device=env.device)
        reseed_dropout(seed=cfg.seed, rank=env.rank, step=step)
        set_learning_rate(state.opt, learning_rate(cfg.lr, cfg.lr_anneal_steps, step))
        state.opt.zero_grad(set_to_none=True)
        losses = accumulate_gradients(self.forward, self.diffusion, inputs, microbatch=self.microbatch,
                                      scaler=state.scaler, precision=self.mixed, stats=self.stats)
        if isinstance(state.timestep_sampler, LossAwareSampler):
            feed_timestep_sampler(state.timestep_sampler, t=inputs.t, losses=losses, rank=env.rank,
                                  world_size=env.world_size)
        grad_norm, finite = apply_gradients(state.opt, state.scaler, list(state.model.parameters()))
        if state.ema is not None:
            state.ema.update(state.model)  # a skipped step left the weights as they were
        self.stats.add_grad_norm(grad_norm, finite)
        state.nonfinite.record(finite)
        state.step += 1
        self.checkpoints.announce()

    def log_row(self, seconds: float, steps: int) -> dict:
        """The log row of the last ``steps`` steps, which took ``seconds``: reduced over all ranks (a
        collective), written by rank 0; returns the progress line's fields."""
        state, cfg = self.state, self.spec.train
        nonfinite_total = state.nonfinite.check(step=state.step, last_good=self.checkpoints.last_good)
        row = self.stats.reduce()
        row.update(step=state.step, images_seen=state.images_seen, lr=state.opt.param_groups[0]["lr"],
                   loss_scale=state.scaler.get_scale(), nonfinite_steps=nonfinite_total,
                   step_time_s=seconds / max(steps, 1), images_per_s=cfg.batch_size * steps / max(seconds, 1e-9))
        if self.log is not None:
            self.log.write(row)
        return {"loss": row.get("loss", float("nan")), "lr": row["lr"]}

    def pictures(self) -> None:
        if self.env.is_main:
            write_pictures(self.spec, step=self.state.step, run_dir=self.run_dir, ema=self.state.ema,
                           model=self.state.model, device=self.env.device, log=self.log,
                           num_labels=len(self.dataset.classes) if self.dataset.classes else None)


def setup(spec, env: RankEnv, hooks) -> Training:
    """Check the inputs (before anything is written), take the run dir, and build the training state from the
    newest checkpoint of the run dir or from train.resume_checkpoint."""
    cfg, device = spec.train, env.device
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    storage.check_store(cfg.data_dir)  # inputs are checked before anything is written
    dataset = open_images(cfg.data_dir, spec.model.output_size, class_cond=spec.model.class_cond,
                          random_flip=cfg.random_flip, seed=cfg.seed, skip_corrupt=cfg.skip_corrupt)
    if spec.model.class_cond and len(dataset.classes) > spec.model.num_classes:
        raise UserError(f"{cfg.data_dir} has {len(dataset.classes)} classes but model.num_classes is "
                        f"{spec.model.num_classes}")
    rank_batch = per_rank_batch(cfg.batch_size, env.world_size)
    if isinstance(cfg.microbatch, int):
        choose_microbatch(cfg.microbatch, rank_batch)
    torch.manual_seed(rng.derive_seed(cfg.seed, rng.Stream.PROCESS))  # the same initial weights on every rank
    model, diffusion = model_and_diffusion(spec.model, spec.diffusion)
    if cfg.resume_checkpoint:  # a bad file fails here; restore() loads it for good
        load_weights(model, cfg.resume_checkpoint, "train.resume_checkpoint")
    run_dir = hooks.begin()
    storage.give_up_retrying_when(hooks.should_suspend)  # a stop ends the retries of a store that is away
    if spec.model.class_cond and env.is_main:
        storage.atomic_write_text(run_dir.classes_file, json.dumps(dataset.classes, indent=1))

    model.to(device)
    microbatch = choose_microbatch(cfg.microbatch, rank_batch, fits=memory_probe(model, diffusion, spec, device))
    state = TrainState(
        spec=spec, env=env, model=model, ema=EMA(model, cfg.ema_rates) if env.is_main else None,
        opt=make_optimizer(list(model.parameters()), lr=cfg.lr, weight_decay=cfg.weight_decay),
        timestep_sampler=create_named_schedule_sampler(cfg.schedule_sampler, diffusion),
        scaler=torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16"),
        loader=ShardedLoader(dataset, global_batch=cfg.batch_size, rank=env.rank, world_size=env.world_size,
                             seed=cfg.seed, num_workers=cfg.num_workers, device=device),
        nonfinite=NonfiniteSteps(cfg.max_nonfinite_steps, device))
    store = CheckpointStore(run_dir.checkpoints)
    restore(state, store)
    checkpoints = Checkpoints(store, is_main=env.is_main, keep_last=cfg.keep_last, keep_every=cfg.keep_every,
                              on_complete=hooks.checkpoint_written)

    ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if env.world_size > 1 else model
    log = TrainingLog(run_dir.path, tensorboard=cfg.tensorboard) if env.is_main else None
    if log is not None:
        log.drop_after(state.step)  # rows a preempted run logged after its checkpoint: they are logged again
    if env.is_main:
        print(f"idiff: {env.describe()}; global batch {cfg.batch_size} = {env.world_size} ranks x {rank_batch}, "
              f"microbatch {microbatch}; {sum(p.numel() for p in model.parameters()):,} parameters; start at step "
              f"{state.step}", file=sys.stderr, flush=True)
    return Training(
        spec=spec, env=env, run_dir=run_dir, dataset=dataset, diffusion=diffusion, state=state,
        checkpoints=checkpoints, forward=torch.compile(ddp) if cfg.compile else ddp, rank_batch=rank_batch,
        microbatch=microbatch, log=log, stats=StepStats(diffusion.num_timesteps, device),
        progress=Progress(cfg.total_steps, desc=f"train {spec.name}", unit="step", initial=state.step,
                          enabled=env.is_main, every=cfg.log_interval, items_per_unit=cfg.batch_size),
        mixed=autocast(device, cfg.precision))


def train(spec, env: RankEnv, hooks) -> str:
    """Train ``spec`` (a TrainJob) on this rank until it ends or is suspended: "completed" / "preempted".

    :param hooks: ``begin()`` takes the run dir once the inputs are checked; ``should_suspend()`` is
        polled at every step boundary (the preemption flag) and all ranks agree before acting on it;
        ``checkpoint_written(step)`` hears of each complete checkpoint on rank 0 (see Checkpoints).
    """
    run = setup(spec, env, hooks)
    cfg, state, checkpoints = spec.train, run.state, run.checkpoints
    start_step = last_saved = state.step  # a resumed run's start is saved already; a fresh start has nothing to save
    data = iter(state.loader)
    tick, tick_step = time.perf_counter(), state.step  # seconds, step: the start of the current log interval

    status = COMPLETED
    while state.step < cfg.total_steps:
        if any_rank(hooks.should_suspend()):
            status = PREEMPTED
            break
        run.optimizer_step(next(data))
        hooks.progress(state.step)
        if cfg.compile and state.step == start_step + 1 and env.is_main:
            print(f"idiff: first step (torch.compile included) took {time.perf_counter() - tick:.1f} s",
                  file=sys.stderr, flush=True)
        fields = {}
        if state.step % cfg.log_interval == 0 or state.step == cfg.total_steps:
            fields = run.log_row(time.perf_counter() - tick, state.step - tick_step)
            tick, tick_step = time.perf_counter(), state.step
        run.progress.update(1, **fields)
        # A checkpoint, written in the background; then rank 0's pictures.
        if state.step % cfg.save_interval == 0 and state.step < cfg.total_steps:
            checkpoints.save(state)
            last_saved = state.step
            run.pictures()

    # The end, or a preemption: nobody leaves (and the job is not requeued) before the last checkpoint is complete.
    run.progress.close()
    if last_saved != state.step:
        checkpoints.save(state, wait=True)
        run.pictures()
    else:
        checkpoints.wait()
    if run.log is not None:
        run.log.close()
    if hooks.cost is not None:
        hooks.cost.checkpoint_s = checkpoints.seconds
    if env.world_size > 1:
        dist.barrier()
    return status
