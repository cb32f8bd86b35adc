"""Training throughput and model FLOPs utilisation on a GPU: the ImageNet-64 model (121M parameters).

    python -m benchmarks.gpu                          # fp32, bf16, fp16 on cuda:0
    python -m benchmarks.gpu --peak-tflops 989        # the dense bf16/fp16 peak of your GPU (H100 SXM: 989)

Per precision: the largest power-of-two batch that fits (or --batch), img/s of the training loop's step
(forward, backward, fused AdamW, EMA), and MFU = model FLOPs/s over the peak (fp32 runs count against
the TF32 peak, half of it by default). It runs on a CPU too (--device cpu), for checking the script.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import idiff
from idiff.precision import autocast
from idiff.train.ema import EMA
from idiff.train.inputs import StepInputs
from idiff.train.optim import accumulate_gradients, apply_gradients, make_optimizer

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"imagenet64": "imagenet64_uncond", "cifar10": "cifar10"}


def flags_of(name):
    return json.loads((ROOT / "tests" / "reference" / "keys" / f"{MODELS[name]}.json").read_text())["full_args"]


def train_step(model, diffusion, opt, ema, scaler, x, precision):
    t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=x.device)
    opt.zero_grad(set_to_none=True)
    inputs = StepInputs(x, t, torch.randn_like(x), torch.ones(x.shape[0], device=x.device), {})
    accumulate_gradients(model, diffusion, inputs, microbatch=x.shape[0], scaler=scaler,
                         precision=autocast(x.device, precision))
    apply_gradients(opt, scaler, list(model.parameters()))
    ema.update(model)


def measure(name, precision, batch, device, steps):
    torch.manual_seed(0)
    model, diffusion = idiff.create_model_and_diffusion(**flags_of(name))
    model.to(device).train()
    opt = make_optimizer(model.parameters(), lr=1e-4, weight_decay=0.0)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    ema = EMA(model, [0.9999])
    size = flags_of(name)["image_size"]
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    with FlopCounterMode(display=False) as counter:
        inputs = StepInputs(x, torch.zeros(batch, dtype=torch.long, device=device), torch.randn_like(x),
                            torch.ones(batch, device=device), {})
        accumulate_gradients(model, diffusion, inputs, microbatch=batch)
    for _ in range(3):
        train_step(model, diffusion, opt, ema, scaler, x, precision)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        train_step(model, diffusion, opt, ema, scaler, x, precision)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), counter.get_total_flops()


def largest_batch(name, precision, device, start):
    batch = start
    while batch >= 1:
        try:
            measure(name, precision, batch, device, steps=1)
            return batch
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            batch //= 2
    raise RuntimeError("not even a batch of 1 fits")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="imagenet64", choices=list(MODELS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precisions", default="fp32,bf16,fp16", type=lambda s: s.split(","))
    parser.add_argument("--batch", type=int, help="per-GPU batch (default: the largest power of two that fits)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16/fp16 peak (H200: ~790)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    rows = []
    for precision in args.precisions:
        batch = args.batch or largest_batch(args.model, precision, device, 256)
        seconds, flops = measure(args.model, precision, batch, device, args.steps)
        peak = args.peak_tflops / (2 if precision == "fp32" else 1)
        rows.append({"model": args.model, "precision": precision, "batch": batch, "step_s": seconds,
                     "images_per_s": batch / seconds, "gflop_per_image": flops / batch / 1e9,
                     "mfu": flops / seconds / (peak * 1e12)})
        print(f"{args.model} {precision:5} batch {batch:4}  {batch / seconds:8.1f} img/s  "
              f"{flops / batch / 1e9:6.1f} GFLOP/img  MFU {100 * rows[-1]['mfu']:5.1f}% of {peak:.0f} TFLOP/s",
              flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(device) if device.type == "cuda"
                                          else "cpu", "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
