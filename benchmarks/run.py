"""Speed of idiff against the original's CPU baseline (tests/reference/timing.json), same protocol.

    python -m benchmarks.run                       # everything, fp32 and bf16, 2 threads
    python -m benchmarks.run --only train --models cifar10 --precisions bf16

Prints a table and writes JSON (benchmarks/results/cpu.json). Ratios are baseline median / idiff median
(> 1 is faster). The machines are shared and noisy: compare medians of runs made side by side, and read
the matmul ceiling measured in the same run (model FLOP/s as a fraction of it) as the noise-free view.
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
from idiff.train.loop import accumulate_gradients, make_optimizer

ROOT = Path(__file__).resolve().parents[1]
BASELINE = json.loads((ROOT / "tests" / "reference" / "timing.json").read_text())
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision):
    return torch.autocast("cpu", dtype=AUTOCAST[precision]) if precision in AUTOCAST else contextlib.nullcontext()


def timed(fn, warmup, reps) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def matmul_ceiling(dtype, n=4096, reps=3) -> float:
    """GFLOP/s of an n x n matmul: the roofline of this machine for ``dtype``."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best = min(timed(lambda: a @ b, 1, reps))
    return 2 * n**3 / best / 1e9


def build(flags):
    torch.manual_seed(0)
    model, diffusion = idiff.create_model_and_diffusion(**flags)
    return model, diffusion


def count_flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def bench_train(flags, precision, reps, warmup):
    model, diffusion = build(flags)
    model.train()
    opt = make_optimizer(model.parameters(), lr=1e-4, weight_decay=0.0)
    x = torch.rand(8, 3, flags["image_size"], flags["image_size"]) * 2 - 1
    ones = torch.ones(8)

    def step():
        opt.zero_grad(set_to_none=True)
        t = torch.randint(0, diffusion.num_timesteps, (8,))
        accumulate_gradients(model, model, diffusion, x, t, torch.randn_like(x), ones, {}, microbatch=8,
                             autocast=autocast(precision))
        opt.step()

    flops = count_flops(lambda: accumulate_gradients(model, model, diffusion, x, torch.zeros(8, dtype=torch.long),
                                                     torch.randn_like(x), ones, {}, microbatch=8))
    model.zero_grad(set_to_none=True)
    return timed(step, warmup, reps), flops


def bench_forward(flags, precision, reps, warmup):
    model, diffusion = build(flags)
    model.eval()
    x = torch.randn(16, 3, flags["image_size"], flags["image_size"])
    t = diffusion.model_timesteps(torch.randint(0, diffusion.num_timesteps, (16,)))

    def forward():
        with torch.inference_mode(), autocast(precision):
            model(x, t)

    return timed(forward, warmup, reps), count_flops(forward)


def bench_ddim(flags, precision, reps, warmup):
    model, diffusion = build({**flags, "timestep_respacing": "ddim10"})
    model.eval()

    def sample():
        with torch.inference_mode(), autocast(precision):
            diffusion.ddim_sample_loop(model, (4, 3, flags["image_size"], flags["image_size"]), eta=0.0)

    return timed(sample, warmup, reps), count_flops(sample)


CASES = {"train": ("train_step_b8", bench_train), "forward": ("forward_b16_no_grad", bench_forward),
         "ddim": ("ddim10_b4", bench_ddim)}


def run_models(args, ceilings):
    rows = []
    for model_name in args.models:
        baseline_model = BASELINE["results"][model_name]
        for case in args.only:
            if case not in CASES:
                continue
            key, fn = CASES[case]
            base = baseline_model[key]
            for precision in args.precisions:
                times, flops = fn(baseline_model["flags"], precision, base["reps"], base["warmup"])
                median = statistics.median(times)
                ceiling = ceilings["bf16" if precision == "bf16" else "fp32"]
                rows.append({
                    "model": model_name, "case": key, "precision": precision, "median_s": median,
                    "all_s": times, "baseline_fp32_median_s": base["median_s"],
                    "speedup_vs_original_fp32": base["median_s"] / median,
                    "model_gflop": flops / 1e9, "gflop_per_s": flops / median / 1e9,
                    "fraction_of_matmul_ceiling": flops / median / 1e9 / ceiling,
                })
                print(f"{model_name:8} {key:20} {precision:5} {median:8.3f} s   original fp32 {base['median_s']:6.3f} s   "
                      f"x{rows[-1]['speedup_vs_original_fp32']:.2f}   {rows[-1]['gflop_per_s']:6.1f} GFLOP/s "
                      f"({100 * rows[-1]['fraction_of_matmul_ceiling']:.0f}% of {ceiling:.0f})", flush=True)
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
    ceilings = {"fp32": matmul_ceiling(torch.float32), "bf16": matmul_ceiling(torch.bfloat16)}
    print(f"torch {torch.__version__}, {args.threads} threads, matmul ceiling: fp32 {ceilings['fp32']:.0f} "
          f"GFLOP/s, bf16 {ceilings['bf16']:.0f} GFLOP/s", flush=True)
    report = {"torch": torch.__version__, "python": platform.python_version(), "threads": args.threads,
              "matmul_gflop_per_s": ceilings, "baseline": {k: BASELINE[k] for k in ("implementation", "torch_version")},
              "models": run_models(args, ceilings)}
    if "data" in args.only:
        report["data"] = run_script("data", out.parent)
    if "collect" in args.only:
        report["collect"] = run_script("collect", out.parent, ["--num-images", "50000"])
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
