"""The training loop: DDP, microbatches, mixed precision, EMA, checkpoints, exact resume.

Every source of randomness is either derived from keys (noise and timesteps from
(seed, step, global sample index); data order from (seed, epoch)) or saved in the checkpoint
(dropout's per-rank torch RNG), so an interrupted and resumed run equals an uninterrupted one
bit for bit, and the same global batch is drawn whatever the world size.
"""

import contextlib
import json
import random
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .. import rng, storage
from ..checkpoints import BackgroundWriter, CheckpointStore, checkpoint_files, step_of
from ..data import ImageDataset, ShardedLoader
from ..diffusion.timestep_sampler import LossAwareSampler, create_named_schedule_sampler
from ..dist.batch import choose_microbatch, per_rank_batch
from ..dist.env import RankEnv
from ..dist.signals import any_rank
from ..errors import RunFailed, UserError
from ..factory import create_any_model_and_diffusion
from ..precision import autocast
from ..visualize import plot_losses
from ..weights import load_weights
from .ema import EMA
from .metrics import MetricsLog, StepStats
from .preview import preview_grid

COMPLETED, PREEMPTED = "completed", "preempted"


def train(spec, env: RankEnv, hooks) -> str:
    """Train ``spec`` (a TrainJob) on this rank until it ends or is suspended: "completed" / "preempted".

    :param hooks: ``begin()`` takes the run dir once the inputs are checked; ``should_suspend()`` is
        polled at every step boundary (the preemption flag) and all ranks agree before acting on it.
    """
    cfg, device = spec.train, env.device
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    dataset = ImageDataset(cfg.data_dir, spec.model.output_size, class_cond=spec.model.class_cond,
                           random_flip=cfg.random_flip, seed=cfg.seed, skip_corrupt=cfg.skip_corrupt)
    if spec.model.class_cond and len(dataset.classes) > spec.model.num_classes:
        raise UserError(f"{cfg.data_dir} has {len(dataset.classes)} classes but model.num_classes is "
                        f"{spec.model.num_classes}")
    rank_batch = per_rank_batch(cfg.batch_size, env.world_size)
    if isinstance(cfg.microbatch, int):
        choose_microbatch(cfg.microbatch, rank_batch)  # fails before anything is written
    _seed_process(cfg.seed)  # identical initial weights on every rank and for every world size
    model, diffusion = create_any_model_and_diffusion(spec.model_flags())
    if cfg.resume_checkpoint:  # a bad file fails before anything is written; _restore loads it for good
        load_weights(model, cfg.resume_checkpoint, "train.resume_checkpoint")
    run_dir = hooks.begin()
    store = CheckpointStore(run_dir.checkpoints)
    if spec.model.class_cond and env.is_main:
        storage.atomic_write_text(run_dir / "classes.json", json.dumps(dataset.classes, indent=1))

    model.to(device)
    params = list(model.parameters())
    microbatch = choose_microbatch(cfg.microbatch, rank_batch,
                                   fits=_memory_probe(model, diffusion, spec, device) if device.type == "cuda" else None)
    sampler = create_named_schedule_sampler(cfg.schedule_sampler, diffusion)
    opt = make_optimizer(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    ema = EMA(model, cfg.ema_rates) if env.is_main else None
    loader = ShardedLoader(dataset, global_batch=cfg.batch_size, rank=env.rank, world_size=env.world_size,
                           seed=cfg.seed, num_workers=cfg.num_workers, device=device)

    step = _restore(spec, env, store, model, opt, ema, sampler, scaler, loader)
    images_seen = step * cfg.batch_size
    ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if env.world_size > 1 else model
    forward = torch.compile(ddp) if cfg.compile else ddp
    log = MetricsLog(run_dir.path) if env.is_main else None
    if log is not None:
        log.drop_after(step)  # rows a preempted run logged after its checkpoint: they are logged again
    if env.is_main:
        print(f"idiff: {env.describe()}; global batch {cfg.batch_size} = {env.world_size} ranks x {rank_batch}, "
              f"microbatch {microbatch}; {sum(p.numel() for p in params):,} parameters; start at step {step}",
              file=sys.stderr, flush=True)

    writer = BackgroundWriter(store) if env.is_main else None
    stats = StepStats(diffusion.num_timesteps, device)
    total_steps = cfg.total_steps
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (env.is_main and sys.stderr.isatty()))
    mixed = autocast(device, cfg.precision)
    nonfinite = torch.zeros(2, dtype=torch.long, device=device)  # [in a row, total], on the device: no syncs
    start_step = last_saved = step  # a resumed run's start is saved already; a fresh start has nothing to save
    data = iter(loader)
    tick, tick_step = time.perf_counter(), step

    def wait_for_writer() -> None:
        """Rank 0's checkpoint writes are done; one that failed (a full disk) stops every rank, exit 1."""
        failure = None
        if env.is_main:
            try:
                writer.wait()
            except (RunFailed, OSError) as err:  # OSError: pruning the old checkpoints failed
                failure = err
        if any_rank(failure is not None):
            raise failure or RunFailed("rank 0 could not write a checkpoint; its message says why")

    def save(now: int, *, wait: bool) -> None:
        wait_for_writer()
        payloads, meta = _snapshot(now, spec, env, model, opt, ema, sampler, scaler, loader, int(nonfinite[1]))
        if env.is_main:
            after = (lambda: store.prune(cfg.keep_last, cfg.keep_every))
            writer.submit(now, payloads, meta, after=after)
            if cfg.sample_grid:
                preview_grid(spec, ema, model, run_dir / f"samples_{now:06d}.png", device,
                             num_labels=len(dataset.classes) if dataset.classes else None)
            rows = log.rows()
            if rows:
                plot_losses(rows, run_dir / "loss.png")
        if wait:
            wait_for_writer()  # nobody leaves (and the job is not requeued) before the checkpoint is complete

    status = COMPLETED
    while step < total_steps:
        if any_rank(hooks.should_suspend()):
            status = PREEMPTED
            break
        batch = next(data)
        x = batch.images
        cond = {"y": batch.labels} if spec.model.class_cond else {}
        if spec.model.is_super_res:
            cond["low_res"] = F.interpolate(x, spec.model.small_size, mode="area")
        # Per-example randomness keyed by (seed, step, index in the global batch): world-size independent.
        global_index = torch.arange(rank_batch) + env.rank * rank_batch
        gens = rng.generators(cfg.seed, rng.Stream.TRAIN_NOISE, global_index.tolist(), step)
        uniforms = np.array([torch.rand((), generator=g, dtype=torch.float64).item() for g in gens])
        noise = rng.normal(gens, x.shape[1:], device)
        t, weights = sampler.sample_from_uniforms(uniforms, device)

        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg.lr, cfg.lr_anneal_steps, step)
        opt.zero_grad(set_to_none=True)
        losses = accumulate_gradients(ddp, forward, diffusion, x, t, noise, weights, cond, microbatch=microbatch,
                                      scaler=scaler, mixed_precision=mixed, stats=stats)
        if isinstance(sampler, LossAwareSampler):
            _update_sampler(sampler, global_index, t, losses, env)

        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
        finite = torch.isfinite(grad_norm)  # identical on all ranks: the gradients are reduced
        optimizer_step(opt, scaler, skip=~finite)
        if ema is not None:
            ema.update(model)  # a skipped step left the weights as they were
        stats.add_grad_norm(grad_norm, finite)
        nonfinite[0] = (nonfinite[0] + 1) * (~finite)  # steps in a row
        nonfinite[1] += (~finite).long()
        step += 1
        images_seen += cfg.batch_size
        bar.update(1)
        if cfg.compile and step == start_step + 1 and env.is_main:
            print(f"idiff: first step (torch.compile included) took {time.perf_counter() - tick:.1f} s",
                  file=sys.stderr, flush=True)

        if step % cfg.log_interval == 0 or step == total_steps:
            in_a_row, nonfinite_total = nonfinite.tolist()
            if in_a_row >= cfg.max_nonfinite_steps:
                _diverged(step, in_a_row, store, writer)
            row = stats.reduce()
            elapsed = time.perf_counter() - tick
            row.update(step=step, images_seen=images_seen, lr=opt.param_groups[0]["lr"], loss_scale=scaler.get_scale(),
                       nonfinite_steps=nonfinite_total, step_time_s=elapsed / max(step - tick_step, 1),
                       images_per_s=cfg.batch_size * (step - tick_step) / max(elapsed, 1e-9))
            tick, tick_step = time.perf_counter(), step
            if env.is_main:
                log.write(row)
                bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}", img_s=f"{row['images_per_s']:.1f}")
        if step % cfg.save_interval == 0 and step < total_steps:
            save(step, wait=False)
            last_saved = step

    bar.close()
    if last_saved != step:
        save(step, wait=True)
    else:
        wait_for_writer()
    if env.world_size > 1:
        dist.barrier()
    return status


def learning_rate(lr: float, anneal_steps: int, step: int) -> float:
    """The original's linear anneal to 0 over ``anneal_steps`` (0: constant), held at 0 after them, never
    negative: a negative rate would ascend the loss."""
    return lr * max(0.0, 1 - step / anneal_steps) if anneal_steps else lr


def optimizer_step(opt, scaler, *, skip) -> None:
    """Step unless ``skip`` (a device bool), decided on the device: no host sync in the loop.

    The fused AdamW reads ``found_inf`` itself, as torch's GradScaler arranges for fp16.
    """
    if scaler.is_enabled():
        scaler.step(opt)
        scaler.update()
        return
    opt.found_inf = skip.float()
    try:
        opt.step()
    finally:
        del opt.found_inf


def make_optimizer(params, *, lr, weight_decay):
    """AdamW, as the original trains (weight decay 0 by default); fused: one pass over all parameters."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def accumulate_gradients(ddp, forward, diffusion, x, t, noise, weights, cond, *, microbatch, scaler=None,
                         mixed_precision=contextlib.nullcontext(), stats=None):
    """Backward of this rank's batch in microbatches; returns the per-example losses.

    Each microbatch's weighted loss is summed and divided by the whole rank batch, so the
    accumulated gradient is the rank batch's mean; DDP syncs only on the last microbatch and
    averages over ranks, giving the global batch's mean gradient whatever the split.
    """
    rank_batch = x.shape[0]
    distributed = isinstance(ddp, DistributedDataParallel)
    per_example = []
    for start in range(0, rank_batch, microbatch):
        end = min(start + microbatch, rank_batch)
        sync = ddp.no_sync() if distributed and end < rank_batch else contextlib.nullcontext()
        with sync:
            with mixed_precision:
                losses = diffusion.training_losses(forward, x[start:end], t[start:end], noise=noise[start:end],
                                                   model_kwargs={k: v[start:end] for k, v in cond.items()})
            loss = (losses["loss"] * weights[start:end]).sum() / rank_batch
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if stats is not None:
            stats.add_losses(t[start:end], losses, weights[start:end])
        per_example.append(losses["loss"].detach())
    return torch.cat(per_example)


def _memory_probe(model, diffusion, spec, device):
    """fits(n): can a forward+backward of n images run on this GPU?"""
    size = spec.model.output_size

    def fits(n):
        try:
            x = torch.zeros(n, 3, size, size, device=device)
            t = torch.zeros(n, dtype=torch.long, device=device)
            kwargs = {"y": torch.zeros(n, dtype=torch.long, device=device)} if spec.model.class_cond else {}
            if spec.model.is_super_res:
                kwargs["low_res"] = torch.zeros(n, 3, spec.model.small_size, spec.model.small_size, device=device)
            with autocast(device, spec.train.precision):
                diffusion.training_losses(model, x, t, model_kwargs=kwargs)["loss"].sum().backward()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    return fits


def _update_sampler(sampler, global_index, t, losses, env):
    """Feed the whole global batch's losses in global-index order, whatever the world size."""
    local = torch.stack([global_index.double(), t.double().cpu(), losses.double().cpu()], dim=1)
    if env.world_size > 1:
        gathered = [torch.empty_like(local) for _ in range(env.world_size)]
        dist.all_gather(gathered, local)
        local = torch.cat(gathered)
    local = local[local[:, 0].argsort()]
    sampler.update_with_all_losses(local[:, 1].long().tolist(), local[:, 2].tolist())


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)),
                                                       "pos": int(np_state[2])},
             "python": _python_state_to_lists(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _python_state_to_lists(state):
    version, internal, gauss = state
    return {"version": version, "internal": list(internal), "gauss": gauss}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"]["key"].numpy().astype(np.uint32), state["numpy"]["pos"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _seed_process(seed: int, *keys: int) -> None:
    derived = rng.derive_seed(seed, rng.Stream.PROCESS, *keys)
    torch.manual_seed(derived)
    np.random.seed(derived % 2**32)
    random.seed(derived)


def _snapshot(step, spec, env, model, opt, ema, sampler, scaler, loader, nonfinite_total):
    """Everything that makes step+1 what it is, as CPU objects (rank 0 gets them; a collective)."""
    rng_states = [None] * env.world_size
    if env.world_size > 1:
        dist.all_gather_object(rng_states, _rng_state())
    else:
        rng_states = [_rng_state()]
    if not env.is_main:
        return None, None
    files = checkpoint_files(step, spec.train.ema_rates)
    payloads = {
        files["model"]: {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        files["opt"]: _cpu(opt.state_dict()),
        files["state"]: {
            "step": step, "images_seen": step * spec.train.batch_size, "world_size": env.world_size,
            "schedule_sampler": sampler.state_dict(), "rng": rng_states, "data": loader.state_dict(),
            "grad_scaler": scaler.state_dict(), "run_hash": spec.run_hash(), "nonfinite_steps": nonfinite_total,
        },
    }
    for rate in spec.train.ema_rates:
        payloads[files[f"ema_{rate}"]] = ema.state_dict(rate)
    return payloads, {"run_hash": spec.run_hash(), "images_seen": step * spec.train.batch_size}


def _cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def _restore(spec, env, store, model, opt, ema, sampler, scaler, loader) -> int:
    """Resume from the newest complete checkpoint in the run dir, else from ``resume_checkpoint``."""
    step = None
    if env.is_main:
        store.remove_stale_temporaries()
        step = store.latest_complete()
    if env.world_size > 1:
        box = [step]
        dist.broadcast_object_list(box, src=0)
        step = box[0]
    if step is not None:
        _load_checkpoint(store, step, spec, env, model, opt, ema, sampler, scaler, loader)
        return step
    _seed_process(spec.train.seed, env.rank)
    if spec.train.resume_checkpoint:
        return _load_resume_checkpoint(spec, env, model, opt, ema, sampler, scaler, loader)
    return 0


def _load_checkpoint(store, step, spec, env, model, opt, ema, sampler, scaler, loader):
    """Everything of checkpoint ``step``: the run continues exactly where it stopped."""
    files = checkpoint_files(step, spec.train.ema_rates)
    state = store.load(files["state"])
    if state["run_hash"] != spec.run_hash():
        raise UserError(f"{store.manifest_path(step)} belongs to another spec (run hash {state['run_hash']}); "
                        f"use another run_dir, or resume_checkpoint to start a new run from its weights")
    _load_weights(store, files, spec, model, opt, ema)
    sampler.load_state_dict(state["schedule_sampler"])
    scaler.load_state_dict(state["grad_scaler"])
    loader.load_state_dict(state["data"])
    if state["world_size"] == env.world_size:
        _set_rng_state(state["rng"][env.rank])
    else:
        if spec.model.dropout > 0:
            warnings.warn(f"resuming on {env.world_size} ranks (was {state['world_size']}): dropout masks "
                          f"will differ from an uninterrupted run")
        _seed_process(spec.train.seed, env.rank, step, state["world_size"])


def _load_weights(store, files, spec, model, opt, ema, *, optional=False):
    """Model, optimizer and EMA files of one checkpoint; ``optional`` skips the ones that are absent."""
    model.load_state_dict(store.load(files["model"]))
    if not optional or storage.exists(store.path(files["opt"])):
        opt.load_state_dict(store.load(files["opt"]))
    if ema is not None:
        for rate in spec.train.ema_rates:
            name = files[f"ema_{rate}"]
            if not optional or storage.exists(store.path(name)):
                ema.load_state_dict(rate, store.load(name))
            else:
                ema.load_state_dict(rate, dict(model.named_parameters()))


def _load_resume_checkpoint(spec, env, model, opt, ema, sampler, scaler, loader) -> int:
    """The original's resume_checkpoint.

    A complete checkpoint of this same spec resumes exactly. Any other ``model{step}.pt`` starts a
    new run (step 0) from its weights, with the optimizer and EMA files beside it when there are
    some (e.g. a second phase at a lower lr); a bare weights file (a released .pt) fine-tunes with
    fresh optimizer state and EMAs that start at the weights.
    """
    path = spec.train.resume_checkpoint
    step = step_of(path)
    folder, name = path.rsplit("/", 1) if "/" in path else (".", path)
    sibling = CheckpointStore(folder)
    if step is not None and step in sibling.steps() and sibling.problem(step) is None:
        files = checkpoint_files(step, spec.train.ema_rates)
        if sibling.load(files["state"])["run_hash"] == spec.run_hash():
            _load_checkpoint(sibling, step, spec, env, model, opt, ema, sampler, scaler, loader)
            return step
        _load_weights(sibling, {**files, "model": name}, spec, model, opt, ema, optional=True)
        return 0
    load_weights(model, path, "train.resume_checkpoint")
    if ema is not None:
        for rate in spec.train.ema_rates:
            ema.load_state_dict(rate, dict(model.named_parameters()))
    return 0


def _diverged(step, count, store, writer):
    if writer is not None:
        writer.wait()
    good = store.latest_complete()
    where = store.manifest_path(good) if good is not None else "none was written"
    raise RunFailed(
        f"training stopped at step {step}: {count} non-finite steps in a row (loss or gradients inf/NaN). "
        f"The run dir keeps its last good checkpoint ({where}); lower train.lr, use precision bf16, or check the data."
    )
