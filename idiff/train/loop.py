"""The training loop: DDP, microbatches, mixed precision, EMA, checkpoints, exact resume.

Nothing random carries over from one step to the next: noise and timesteps come from (seed, step, global
sample index), data order from (seed, epoch), dropout from (seed, rank, step) (train/inputs.py). So an
interrupted and resumed run equals an uninterrupted one bit for bit, and the same global batch is drawn
whatever the world size. What a checkpoint holds is train/state.py's TrainState.
"""

import json
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .. import rng, storage
from ..checkpoints import CheckpointStore
from ..data import ShardedLoader, open_images
from ..diffusion.timestep_sampler import LossAwareSampler, create_named_schedule_sampler
from ..errors import UserError
from ..factory import create_any_model_and_diffusion
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


def train(spec, env: RankEnv, hooks) -> str:
    """Train ``spec`` (a TrainJob) on this rank until it ends or is suspended: "completed" / "preempted".

    :param hooks: ``begin()`` takes the run dir once the inputs are checked; ``should_suspend()`` is
        polled at every step boundary (the preemption flag) and all ranks agree before acting on it;
        ``checkpoint_written(step)`` hears of each complete checkpoint on rank 0 (see Checkpoints).
    """
    cfg, device = spec.train, env.device
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)

    # Inputs: checked before anything is written.
    storage.check_store(cfg.data_dir)
    dataset = open_images(cfg.data_dir, spec.model.output_size, class_cond=spec.model.class_cond,
                           random_flip=cfg.random_flip, seed=cfg.seed, skip_corrupt=cfg.skip_corrupt)
    if spec.model.class_cond and len(dataset.classes) > spec.model.num_classes:
        raise UserError(f"{cfg.data_dir} has {len(dataset.classes)} classes but model.num_classes is "
                        f"{spec.model.num_classes}")
    rank_batch = per_rank_batch(cfg.batch_size, env.world_size)
    if isinstance(cfg.microbatch, int):
        choose_microbatch(cfg.microbatch, rank_batch)
    torch.manual_seed(rng.derive_seed(cfg.seed, rng.Stream.PROCESS))  # the same initial weights on every rank
    model, diffusion = create_any_model_and_diffusion(spec.model_flags())
    if cfg.resume_checkpoint:  # a bad file fails here; restore() loads it for good
        load_weights(model, cfg.resume_checkpoint, "train.resume_checkpoint")
    run_dir = hooks.begin()
    storage.give_up_retrying_when(hooks.should_suspend)  # a stop ends the retries of a store that is away
    if spec.model.class_cond and env.is_main:
        storage.atomic_write_text(run_dir.classes_file, json.dumps(dataset.classes, indent=1))

    # The training state, from the newest checkpoint of the run dir, or train.resume_checkpoint.
    model.to(device)
    params = list(model.parameters())
    microbatch = choose_microbatch(cfg.microbatch, rank_batch, fits=memory_probe(model, diffusion, spec, device))
    timestep_sampler = create_named_schedule_sampler(cfg.schedule_sampler, diffusion)
    opt = make_optimizer(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    ema = EMA(model, cfg.ema_rates) if env.is_main else None
    loader = ShardedLoader(dataset, global_batch=cfg.batch_size, rank=env.rank, world_size=env.world_size,
                           seed=cfg.seed, num_workers=cfg.num_workers, device=device)
    nonfinite = NonfiniteSteps(cfg.max_nonfinite_steps, device)
    state = TrainState(spec=spec, env=env, model=model, opt=opt, ema=ema, timestep_sampler=timestep_sampler,
                       scaler=scaler, loader=loader, nonfinite=nonfinite)
    store = CheckpointStore(run_dir.checkpoints)
    restore(state, store)
    checkpoints = Checkpoints(store, is_main=env.is_main, keep_last=cfg.keep_last, keep_every=cfg.keep_every,
                              on_complete=hooks.checkpoint_written)

    # Distribution, logs, progress.
    ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if env.world_size > 1 else model
    forward = torch.compile(ddp) if cfg.compile else ddp
    log = TrainingLog(run_dir.path, tensorboard=cfg.tensorboard) if env.is_main else None
    if log is not None:
        log.drop_after(state.step)  # rows a preempted run logged after its checkpoint: they are logged again
    if env.is_main:
        print(f"idiff: {env.describe()}; global batch {cfg.batch_size} = {env.world_size} ranks x {rank_batch}, "
              f"microbatch {microbatch}; {sum(p.numel() for p in params):,} parameters; start at step {state.step}",
              file=sys.stderr, flush=True)
    stats = StepStats(diffusion.num_timesteps, device)
    progress = Progress(cfg.total_steps, desc=f"train {spec.name}", unit="step", initial=state.step,
                        enabled=env.is_main, every=cfg.log_interval, items_per_unit=cfg.batch_size)
    mixed = autocast(device, cfg.precision)
    start_step = last_saved = state.step  # a resumed run's start is saved already; a fresh start has nothing to save
    data = iter(loader)
    tick, tick_step = time.perf_counter(), state.step

    def pictures() -> None:
        if env.is_main:
            write_pictures(spec, step=state.step, run_dir=run_dir, ema=ema, model=model, device=device,
                           num_labels=len(dataset.classes) if dataset.classes else None, log=log)

    status = COMPLETED
    while state.step < cfg.total_steps:
        if any_rank(hooks.should_suspend()):
            status = PREEMPTED
            break

        # One optimizer step on the global batch.
        step = state.step
        inputs = draw_inputs(next(data), spec=spec, timestep_sampler=timestep_sampler, step=step, rank=env.rank,
                             device=device)
        reseed_dropout(seed=cfg.seed, rank=env.rank, step=step)
        set_learning_rate(opt, learning_rate(cfg.lr, cfg.lr_anneal_steps, step))
        opt.zero_grad(set_to_none=True)
        losses = accumulate_gradients(forward, diffusion, inputs, microbatch=microbatch, scaler=scaler,
                                      precision=mixed, stats=stats)
        if isinstance(timestep_sampler, LossAwareSampler):
            feed_timestep_sampler(timestep_sampler, t=inputs.t, losses=losses, rank=env.rank, world_size=env.world_size)
        grad_norm, finite = apply_gradients(opt, scaler, params)
        if ema is not None:
            ema.update(model)  # a skipped step left the weights as they were
        stats.add_grad_norm(grad_norm, finite)
        nonfinite.record(finite)
        state.step += 1
        checkpoints.announce()
        if cfg.compile and state.step == start_step + 1 and env.is_main:
            print(f"idiff: first step (torch.compile included) took {time.perf_counter() - tick:.1f} s",
                  file=sys.stderr, flush=True)

        # A log row: reduced over all ranks (a collective), written by rank 0.
        fields = {}
        if state.step % cfg.log_interval == 0 or state.step == cfg.total_steps:
            nonfinite_total = nonfinite.check(step=state.step, last_good=checkpoints.last_good)
            row = stats.reduce()
            elapsed, steps = time.perf_counter() - tick, state.step - tick_step
            row.update(step=state.step, images_seen=state.images_seen, lr=opt.param_groups[0]["lr"],
                       loss_scale=scaler.get_scale(), nonfinite_steps=nonfinite_total,
                       step_time_s=elapsed / max(steps, 1), images_per_s=cfg.batch_size * steps / max(elapsed, 1e-9))
            tick, tick_step = time.perf_counter(), state.step
            if log is not None:
                log.write(row)
            fields = {"loss": row.get("loss", float("nan")), "lr": row["lr"]}
        progress.update(1, **fields)

        # A checkpoint, written in the background; then rank 0's pictures.
        if state.step % cfg.save_interval == 0 and state.step < cfg.total_steps:
            checkpoints.save(state)
            last_saved = state.step
            pictures()

    # The end, or a preemption: nobody leaves (and the job is not requeued) before the last checkpoint is complete.
    progress.close()
    if last_saved != state.step:
        checkpoints.save(state, wait=True)
        pictures()
    else:
        checkpoints.wait()
    if log is not None:
        log.close()
    if env.world_size > 1:
        dist.barrier()
    return status
