"""Accuracy per model evaluation of the samplers on a trained model, against a reference solution of the same ODE.

    python -m benchmarks.samplers                      # trains jobs/demo.yaml into runs/demo first (resumes/no-op)
    python -m benchmarks.samplers --run runs/demo --images 32

Every sampler draws the same images: the x_T and labels of sample indices 0..N-1 of a sample job with seed 0 and
balanced labels (``idiff.sample.draw_samples``), from the run's EMA weights, on the model's whole chain. DDIM takes
IDDPM's evenly spaced N steps (timestep_respacing "N"); each ODE solver runs with each spacing at the same NFE.
The error is the RMSE, in 0-255 pixel units, of the final x_0 (before quantisation) against the reference:
DPM-Solver++(3M) with --reference-steps steps uniform in log-SNR over the whole chain, its first step included
(the samplers' spacings take the cosine schedule's clipped last step in one step, see idiff/diffusion/ode_samplers.py).
The reference's own error is bounded by its distance to the same solve with half as many steps; the error of taking
that first step in one step, by the same solve with the samplers' logsnr_uniform spacing. Wall time per image is
the batch's time over N, on a shared machine.

Writes JSON (default benchmarks/results/samplers.json), the log-log plot of error against NFE
(benchmarks/results/samplers.png, tracked in git) and the section between the markers in benchmarks/README.md.
"""

import argparse
import json
import math
import platform
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

from idiff import weights
from idiff.diffusion.draw import draw_samples
from idiff.diffusion.ode_samplers import SPACINGS, level_at
from idiff.diffusion.samplers import ODE_SAMPLERS
from idiff.factory import diffusion_from_flags
from idiff.jobspec.load import parse_spec

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BEGIN, END = "<!-- samplers: begin (written by python -m benchmarks.samplers) -->", "<!-- samplers: end -->"
PIXELS = 127.5  # [-1, 1] -> 0-255 units


def train_demo(run: str) -> None:
    """The demo model as `make demo` trains it (an existing run resumes, a finished one stops at once)."""
    if not (ROOT / "data" / "synthetic").is_dir():
        subprocess.run([sys.executable, "-m", "idiff.cli", "data", "synthetic",
                        "--out", str(ROOT / "data" / "synthetic"), "--n", "512", "--image-size", "32",
                        "--classes", "4"], check=True, cwd=ROOT)
    subprocess.run([sys.executable, "-m", "idiff.cli", "train", "jobs/demo.yaml", "--set", f"run_dir={run}"],
                   check=True, cwd=ROOT)


def load(run: str):
    spec = parse_spec({"kind": "sample", "name": "bench-samplers", "run_dir": str(RESULTS / "unused"),
                       "sample": {"from_run": run}})
    source = weights.resolve(spec, spec.sample)
    model, diffusion = source.build("cpu", timestep_respacing="")
    return model, diffusion, source.flags


class Drawer:
    """x_0 of the same N indices for any sampler; the seconds each call took."""

    def __init__(self, model, diffusion, flags, images, clip):
        self.model, self.diffusion, self.flags, self.clip = model, diffusion, flags, clip
        self.indices = list(range(images))
        num_classes = flags["num_classes"]
        self.labels = [i % num_classes for i in self.indices] if flags["class_cond"] else None

    def __call__(self, sampler, nfe, spacing="time_uniform", times=None):
        diffusion, options = self.diffusion, {"steps": nfe, "spacing": spacing, "times": times}
        if sampler == "ddim":  # DDIM steps through a respaced chain, as sample.steps N does
            diffusion, options = diffusion_from_flags({**self.flags, "timestep_respacing": str(nfe)}), {}
        start = time.perf_counter()
        x_0, _ = draw_samples(self.model, diffusion, self.indices, seed=0, image_size=self.flags["image_size"],
                              sampler=sampler, sampler_options=options, clip_denoised=self.clip, labels=self.labels)
        return x_0.double(), time.perf_counter() - start


def rmse(a, b) -> float:
    return PIXELS * float(((a - b) ** 2).mean().sqrt())


def whole_chain_logsnr_times(diffusion, points) -> list[float]:
    """Chain times evenly spaced in log-SNR from step K-1 itself (not K-2) down to step 0."""
    last = diffusion.num_timesteps - 1
    lams = np.linspace(level_at(diffusion, last).lam, level_at(diffusion, 0).lam, points)
    return [float(last), *(diffusion.time_at(-lam) for lam in lams[1:-1]), 0.0]


def order(nfes, errors, floor) -> float | None:
    """Least-squares slope of -log(error) against log(NFE), over NFE >= 10 with error above 3x the floor."""
    points = [(math.log(n), math.log(e)) for n, e in zip(nfes, errors) if n >= 10 and e > 3 * floor]
    if len(points) < 2:
        return None
    x, y = np.array(points).T
    return float(-np.polyfit(x, y, 1)[0])


def run(args):
    if args.run is None:
        args.run = "runs/demo"
        train_demo(args.run)
    torch.set_num_threads(args.threads)
    model, diffusion, flags = load(args.run)
    draw = Drawer(model, diffusion, flags, args.images, clip=not args.no_clip)
    print(f"{args.run}: T={diffusion.num_timesteps} {flags['noise_schedule']}, {args.images} images of "
          f"{flags['image_size']}px, clip_denoised={draw.clip}, {args.threads} threads", flush=True)

    steps = args.reference_steps
    reference, seconds = draw("dpmpp_3m", steps, times=whole_chain_logsnr_times(diffusion, steps))
    coarser, _ = draw("dpmpp_3m", steps // 2, times=whole_chain_logsnr_times(diffusion, steps // 2))
    first_step_in_one, _ = draw("dpmpp_3m", steps, "logsnr_uniform")
    ddim_all, _ = draw("ddim", diffusion.num_timesteps)
    ref = {"sampler": "dpmpp_3m", "steps": steps, "rmse_to_half_as_many_steps": rmse(reference, coarser),
           "first_step_in_one_rmse": rmse(first_step_in_one, reference),
           "ddim_all_steps_rmse": rmse(ddim_all, reference),
           "seconds_per_image": seconds / args.images}
    floor = max(ref["rmse_to_half_as_many_steps"], ref["first_step_in_one_rmse"])
    report = {"run": args.run, "images": args.images, "image_size": flags["image_size"], "threads": args.threads,
              "diffusion_steps": diffusion.num_timesteps, "noise_schedule": flags["noise_schedule"],
              "clip_denoised": draw.clip, "nfe": args.nfe, "torch": torch.__version__,
              "python": platform.python_version(), "reference": ref, "results": []}
    print(f"reference: dpmpp_3m, {steps} steps uniform in log-SNR over the whole chain; RMSE to {steps // 2} steps "
          f"{ref['rmse_to_half_as_many_steps']:.2g}, to {steps} steps of logsnr_uniform (the chain's first step in "
          f"one) {ref['first_step_in_one_rmse']:.2g}, to DDIM with all {diffusion.num_timesteps} steps "
          f"{ref['ddim_all_steps_rmse']:.3g}", flush=True)
    for sampler, spacing in [("ddim", "time_uniform"), *[(s, p) for s in ODE_SAMPLERS for p in SPACINGS]]:
        errors, times = [], []
        for nfe in args.nfe:
            x_0, seconds = draw(sampler, nfe, spacing)
            errors.append(rmse(x_0, reference))
            times.append(seconds / args.images)
        row = {"sampler": sampler, "spacing": spacing, "rmse": errors, "seconds_per_image": times,
               "order": order(args.nfe, errors, floor)}
        report["results"].append(row)
        print(f"{label(row):32} " + " ".join(f"{e:9.3g}" for e in errors) + f"   order {fmt_order(row['order'])}",
              flush=True)
    return report


def label(row) -> str:
    return "ddim (timestep_respacing N)" if row["sampler"] == "ddim" else f"{row['sampler']} {row['spacing']}"


def fmt_order(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def goals(report) -> list[str]:
    nfe = report["nfe"]
    ddim = next(r for r in report["results"] if r["sampler"] == "ddim")
    at = {n: i for i, n in enumerate(nfe)}
    lines = []
    for few, many in ((20, 100), (10, 50)):
        if few not in at or many not in at:
            continue
        best = min((r for r in report["results"] if r["sampler"] != "ddim"), key=lambda r: r["rmse"][at[few]])
        met = best["rmse"][at[few]] <= ddim["rmse"][at[many]]
        lines.append(f"- {label(best)} at {few} NFE: {best['rmse'][at[few]]:.3g} against DDIM at {many}: "
                     f"{ddim['rmse'][at[many]]:.3g}: **{'met' if met else 'not met'}**")
    return lines


def markdown(report) -> str:
    nfe, ref = report["nfe"], report["reference"]
    settings = (
        f"Model `{report['run']}` (T={report['diffusion_steps']}, {report['noise_schedule']} schedule, learned "
        f"sigmas, class-conditional), {report['images']} images of {report['image_size']}px, EMA weights, "
        f"clip_denoised={str(report['clip_denoised']).lower()}, {report['threads']} threads, torch {report['torch']}. "
        f"Reference: DPM-Solver++(3M), {ref['steps']} steps uniform in log-SNR over the whole chain. Its RMSE to the "
        f"same solve with half as many steps is {ref['rmse_to_half_as_many_steps']:.2g}; to the same solve with the "
        f"samplers' logsnr_uniform spacing, which takes the chain's first step in one step, "
        f"{ref['first_step_in_one_rmse']:.2g} (a floor for every sampler here, DDIM included); to DDIM with all "
        f"{report['diffusion_steps']} steps {ref['ddim_all_steps_rmse']:.3g}.")
    lines = [
        BEGIN,
        *textwrap.wrap(settings, 115),
        "",
        "RMSE to the reference, 0-255 pixel units; order = least-squares slope over NFE >= 10 where the error",
        "is above 3x that floor:",
        "",
        "| sampler | spacing | order | " + " | ".join(f"NFE {n}" for n in nfe) + " |",
        "|---|---|---|" + "---|" * len(nfe),
    ]
    for row in report["results"]:
        spacing = "IDDPM respacing" if row["sampler"] == "ddim" else row["spacing"]
        lines.append(f"| {row['sampler']} | {spacing} | {fmt_order(row['order'])} | "
                     + " | ".join(f"{e:.3g}" for e in row["rmse"]) + " |")
    lines += ["", "Wall time per image, ms: the fastest of a sampler's spacings at each NFE (the model's evaluations",
              "dominate; on a shared machine single timings vary severalfold):", "",
              "| sampler | " + " | ".join(f"NFE {n}" for n in nfe) + " |", "|---|" + "---|" * len(nfe)]
    for sampler in dict.fromkeys(row["sampler"] for row in report["results"]):
        rows = [row["seconds_per_image"] for row in report["results"] if row["sampler"] == sampler]
        lines.append(f"| {sampler} | " + " | ".join(f"{1000 * min(times):.0f}" for times in zip(*rows)) + " |")
    lines += ["", "Goal (the best new sampler at few NFE against DDIM at many):", "", *goals(report), "",
              "![RMSE to the reference against NFE](results/samplers.png)", END]
    return "\n".join(lines)


def write_readme(path: Path, section: str) -> None:
    text = path.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Samplers: error against model evaluations\n\n" + section + "\n"
    path.write_text(text)


def plot(report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"time_uniform": "-", "logsnr_uniform": "--", "karras": ":"}
    colours = {"ddim": "black", "dpmpp_2m": "tab:blue", "dpmpp_3m": "tab:red", "heun": "tab:green"}
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=110)
    for row in report["results"]:
        ax.loglog(report["nfe"], row["rmse"], styles[row["spacing"]], color=colours[row["sampler"]], marker="o",
                  markersize=3, linewidth=2 if row["sampler"] == "ddim" else 1.2,
                  label=f"{label(row)} (order {fmt_order(row['order'])})")
    ax.axhline(report["reference"]["rmse_to_half_as_many_steps"], color="grey", linewidth=0.8,
               label="reference vs half its steps")
    ax.axhline(report["reference"]["first_step_in_one_rmse"], color="grey", linewidth=0.8, linestyle="--",
               label="the chain's first step in one step")
    ax.set_xlabel("model evaluations (NFE)")
    ax.set_ylabel("RMSE to the reference, 0-255 pixel units")
    ax.set_title(f"{report['run']}: T={report['diffusion_steps']} {report['noise_schedule']}, "
                 f"{report['images']} images")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", help="a trained run dir (default: train jobs/demo.yaml into runs/demo)")
    parser.add_argument("--images", type=int, default=32, help="images per sampler (default: 32)")
    parser.add_argument("--nfe", default=[5, 10, 20, 50, 100], type=lambda s: [int(n) for n in s.split(",")])
    parser.add_argument("--reference-steps", type=int, default=1000)
    parser.add_argument("--no-clip", action="store_true", help="clip_denoised false (default: true, as specs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "samplers.json"))
    parser.add_argument("--plot", default=str(RESULTS / "samplers.png"))
    parser.add_argument("--readme", default=str(ROOT / "benchmarks" / "README.md"))
    args = parser.parse_args(argv)
    report = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    plot(report, Path(args.plot))
    if args.readme:
        write_readme(Path(args.readme), markdown(report))
    print("\n".join(goals(report)))
    print(f"wrote {out}, {args.plot}" + (f", {args.readme}" if args.readme else ""))


if __name__ == "__main__":
    main()
