"""Speed of idiff against the original, same protocol as tests/reference/timing.json, side by side.

    python -m benchmarks.run                                   # everything: fp32 and bf16, 2 threads
    python -m benchmarks.run --only train --models cifar10 --precisions bf16

Each case is timed for idiff and for the original's compute choices re-created on the same machine
(benchmarks/original_style.py), with the repetitions interleaved so that load from other processes hits
both alike. Speedups are medians' ratios against the original's fp32 (> 1 is faster), measured here, and
against timing.json's medians from the original's machine. Model FLOP/s are also given as a fraction of
this machine's ceiling (the best of a large matmul and a large convolution).
Writes JSON (default benchmarks/results/cpu.json).
"""

import argparse
import contextlib
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import idiff
from idiff.precision import autocast
from idiff.train.inputs import StepInputs
from idiff.train.optim import accumulate_gradients, make_optimizer

from .original_style import original_optimizer, original_style

ROOT = Path(__file__).resolve().parents[1]
BASELINE = json.loads((ROOT / "tests" / "reference" / "timing.json").read_text())
CASES = {"train": "train_step_b8", "forward": "forward_b16_no_grad", "ddim": "ddim10_b4"}


def best_time(fn, reps=5) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def ceiling(dtype, n=4096) -> float:
    """This machine's dense-compute roofline for ``dtype``, GFLOP/s: the faster of a 4096^2 matmul and a
    large 3x3 convolution (on AMD CPUs MKL's fp32 matmul lags oneDNN's convolutions by far)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    matmul = 2 * n**3 / best_time(lambda: a @ b) / 1e9
    conv = torch.nn.Conv2d(256, 256, 3, padding=1).to(dtype)
    x = torch.randn(16, 256, 32, 32, dtype=dtype)
    with torch.inference_mode():
        convolution = 2 * 256 * 256 * 9 * 32 * 32 * 16 / best_time(lambda: conv(x)) / 1e9
    return max(matmul, convolution)


def make_case(case, flags, precision, original):
    """(a zero-argument callable doing one timed repetition, its model FLOPs)."""
    torch.manual_seed(0)
    if case == "ddim":
        flags = {**flags, "timestep_respacing": "ddim10"}
    model, diffusion = idiff.create_model_and_diffusion(**flags)
    size = flags["image_size"]
    style = original_style if original else contextlib.nullcontext
    inference = torch.no_grad if original else torch.inference_mode
    if case == "train":
        model.train()
        opt = (original_optimizer if original else make_optimizer)(model.parameters(), lr=1e-4, weight_decay=0.0)
        x, ones = torch.rand(8, 3, size, size) * 2 - 1, torch.ones(8)

        def run():
            with style():
                opt.zero_grad(set_to_none=True)
                t = torch.randint(0, diffusion.num_timesteps, (8,))
                accumulate_gradients(model, diffusion, StepInputs(x, t, torch.randn_like(x), ones, {}), microbatch=8,
                                     precision=autocast("cpu", precision))
                opt.step()

        def flops_of():
            inputs = StepInputs(x, torch.zeros(8, dtype=torch.long), torch.randn_like(x), ones, {})
            accumulate_gradients(model, diffusion, inputs, microbatch=8)
            model.zero_grad(set_to_none=True)
        return run, count_flops(flops_of)
    model.eval()
    if case == "forward":
        x = torch.randn(16, 3, size, size)
        t = diffusion.model_timesteps(torch.randint(0, diffusion.num_timesteps, (16,)))

        def run():
            with style(), inference(), autocast("cpu", precision):
                model(x, t)
    else:
        def run():
            with style(), inference(), autocast("cpu", precision):
                diffusion.ddim_sample_loop(model, (4, 3, size, size), eta=0.0)
    return run, count_flops(run)


def count_flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def interleaved(runs: dict, warmup: int, reps: int) -> dict:
    for run in runs.values():
        for _ in range(warmup):
            run()
    times = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def run_models(args, ceilings):
    rows = []
    for model_name in args.models:
        reference = BASELINE["results"][model_name]
        for case in [c for c in args.only if c in CASES]:
            base = reference[CASES[case]]
            runs, flops = {}, {}
            for precision in args.precisions:
                for original in (False, True):
                    runs[(precision, original)], flops[original] = make_case(case, reference["flags"], precision,
                                                                             original)
            flops = flops[True]  # torch's counter sees the einsum attention, not every fused SDPA kernel
            times = interleaved(runs, base["warmup"], base["reps"])
            original_fp32 = statistics.median(times[("fp32", True)]) if ("fp32", True) in times else None
            for (precision, original), samples in times.items():
                median = statistics.median(samples)
                ceiling = ceilings["bf16" if precision == "bf16" else "fp32"]
                row = {
                    "model": model_name, "case": CASES[case], "precision": precision,
                    "implementation": "original-style" if original else "idiff", "median_s": median, "all_s": samples,
                    "speedup_vs_original_fp32_here": original_fp32 / median if original_fp32 else None,
                    "speedup_vs_timing_json": base["median_s"] / median,
                    "model_gflop": flops / 1e9, "gflop_per_s": flops / median / 1e9,
                    "fraction_of_ceiling": flops / median / 1e9 / ceiling,
                }
                rows.append(row)
                here = f"x{row['speedup_vs_original_fp32_here']:.2f}" if original_fp32 else "  -  "
                print(f"{model_name:8} {row['case']:20} {precision:5} {row['implementation']:15} {median:7.3f} s  "
                      f"{here} vs original fp32 here  x{row['speedup_vs_timing_json']:.2f} vs timing.json  "
                      f"{row['gflop_per_s']:5.0f} GFLOP/s = {100 * row['fraction_of_ceiling']:3.0f}% of ceiling",
                      flush=True)
    return rows


def run_script(name, out_dir, extra=()):
    out = out_dir / f"{name}.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"bench_{name}.py"), "--out", str(out), *extra],
                   check=True)
    return json.loads(out.read_text())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="train,forward,ddim,data,collect", type=lambda s: s.split(","))
    parser.add_argument("--models", default="cifar10,small", type=lambda s: s.split(","))
    parser.add_argument("--precisions", default="fp32,bf16", type=lambda s: s.split(","))
    parser.add_argument("--threads", type=int, default=BASELINE["torch_threads"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ceilings = {"fp32": ceiling(torch.float32), "bf16": ceiling(torch.bfloat16)}
    print(f"torch {torch.__version__}, {args.threads} threads, ceiling (best of matmul and conv): fp32 "
          f"{ceilings['fp32']:.0f} GFLOP/s, bf16 {ceilings['bf16']:.0f} GFLOP/s", flush=True)
    report = {"torch": torch.__version__, "python": platform.python_version(), "threads": args.threads,
              "ceiling_gflop_per_s": ceilings,
              "baseline": {k: BASELINE[k] for k in ("implementation", "torch_version")},
              "models": run_models(args, ceilings)}
    if "data" in args.only:
        report["data"] = run_script("data", out.parent)
    if "collect" in args.only:
        report["collect"] = run_script("collect", out.parent, ["--num-images", "50000"])
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
