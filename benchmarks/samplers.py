"""Accuracy per model evaluation of the samplers on a trained model, against a reference solution of the same ODE.

    python -m benchmarks.samplers                      # trains jobs/demo.yaml into runs/demo first (resumes/no-op)
    python -m benchmarks.samplers --run runs/demo --images 16 --warmup 16

Every sampler draws the same held-out images: the x_T and labels of sample indices 0..N-1 of a sample job with
seed 0 and balanced labels (``idiff.sample.draw_samples``), from the run's EMA weights, on the model's whole chain.
DDIM takes IDDPM's evenly spaced N steps (timestep_respacing "N"); each ODE solver runs with the log-SNR-uniform
and Karras spacings and with schedules tuned by ``idiff.diffusion.schedule_search`` (what `idiff tune-schedule`
runs) on warm-up images of another seed (1), at the same NFE. The error is the RMSE, in 0-255 pixel units, of
the final x_0 (before quantisation) against the reference: DPM-Solver++(3M) with --reference-steps steps uniform
in log-SNR from the grids' start (see idiff/diffusion/ode_samplers.py, "The first step"). The reference's own
error is bounded by its distance to the same solve with half as many steps; its distance to the same solve over
the whole chain (from step K-1, whose x_0 prediction is noise) shows what starting below the clipped steps moves.
Wall time per image is the batch's time over N, on a shared machine.

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
from idiff.diffusion.draw import draw_samples, sample_inputs
from idiff.diffusion.ode_samplers import level_at
from idiff.diffusion.samplers import ODE_SAMPLERS
from idiff.diffusion.schedule_search import FineReference, tune_times
from idiff.factory import diffusion_from_flags
from idiff.jobspec.load import parse_spec

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BEGIN, END = "<!-- samplers: begin (written by python -m benchmarks.samplers) -->", "<!-- samplers: end -->"
PIXELS = 127.5  # [-1, 1] -> 0-255 units
SCHEDULES = ("logsnr_uniform", "karras", "tuned")  # time_uniform: far behind at few steps (see the README)
HELD_OUT_SEED, WARMUP_SEED = 0, 1
LARGE_RUN = 50_000  # images, for the search's cost relative to drawing them
CLI_WARMUP = 64  # idiff tune-schedule's default --warmup


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
    return model, diffusion, {**source.model.model_dump(), **source.diffusion.model_dump()}, Path(source.path).name


class Drawer:
    """x_0 of the same N indices of ``seed`` for any sampler; the seconds each call took."""

    def __init__(self, model, diffusion, flags, images, clip, seed):
        self.model, self.diffusion, self.flags, self.clip, self.seed = model, diffusion, flags, clip, seed
        self.indices = list(range(images))
        num_classes = flags["num_classes"]
        self.labels = [i % num_classes for i in self.indices] if flags["class_cond"] else None

    def __call__(self, sampler, nfe, spacing="time_uniform", times=None):
        diffusion, options = self.diffusion, {"steps": nfe, "spacing": spacing, "times": times}
        if sampler == "ddim":  # DDIM steps through a respaced chain, as sample.steps N does
            diffusion, options = diffusion_from_flags({**self.flags, "timestep_respacing": str(nfe)}), {}
        start = time.perf_counter()
        x_0, _ = draw_samples(self.model, diffusion, self.indices, seed=self.seed, image_size=self.flags["image_size"],
                              sampler=sampler, sampler_options=options, clip_denoised=self.clip, labels=self.labels)
        return x_0.double(), time.perf_counter() - start

    def inputs(self):
        """(x_T, model_kwargs) of the indices, as draw_samples makes them."""
        _, x_T, model_kwargs, _ = sample_inputs(self.indices, seed=self.seed, image_size=self.flags["image_size"],
                                                labels=self.labels)
        return x_T, model_kwargs


def rmse(a, b) -> float:
    return PIXELS * float(((a - b) ** 2).mean().sqrt())


def whole_chain_logsnr_times(diffusion, points) -> list[float]:
    """Chain times evenly spaced in log-SNR from step K-1 itself down to step 0."""
    last = diffusion.num_timesteps - 1
    lams = np.linspace(level_at(diffusion, last).lam, level_at(diffusion, 0).lam, points)
    return [float(last), *(diffusion.time_at(-lam) for lam in lams[1:-1]), 0.0]


def order(nfes, errors, floor) -> float | None:
    """Least-squares slope of -log(error) against log(NFE), over NFE >= 10 with error above 3x the floor."""
    points = [(math.log(n), math.log(e)) for n, e in zip(nfes, errors)
              if n >= 10 and e is not None and e > 3 * floor]
    if len(points) < 2:
        return None
    x, y = np.array(points).T
    return float(-np.polyfit(x, y, 1)[0])


def tune(model, diffusion, flags, args, clip):
    """Schedules tuned on the warm-up images for every solver at every NFE up to --tune-max-nfe, and their cost."""
    x_T, model_kwargs = Drawer(model, diffusion, flags, args.warmup, clip, WARMUP_SEED).inputs()
    with torch.inference_mode():
        reference = FineReference.solve(diffusion, model, x_T, clip_denoised=clip, model_kwargs=model_kwargs,
                                        fine_points=args.fine_points)
        tuned = {(sampler, nfe): tune_times(diffusion, model, reference, sampler=sampler, steps=nfe)
                 for sampler in ODE_SAMPLERS for nfe in args.nfe if nfe <= args.tune_max_nfe}
    cost = {"warmup_images": args.warmup, "fine_points": len(reference.times),
            "reference_seconds": reference.seconds,
            "schedules": [{"sampler": sampler, "nfe": nfe, "nfe_per_image": r.nfe, "seconds": r.seconds,
                           "fraction_of_50k_images": r.nfe * args.warmup / (LARGE_RUN * nfe),
                           "kept": min(r.candidates, key=r.candidates.get),
                           "warmup_rmse": {k: PIXELS * v for k, v in r.candidates.items()}}
                          for (sampler, nfe), r in tuned.items()]}
    return {key: r.times for key, r in tuned.items()}, cost


def run(args):
    if args.run is None:
        args.run = "runs/demo"
        train_demo(args.run)
    torch.set_num_threads(args.threads)
    model, diffusion, flags, weights_file = load(args.run)
    clip = not args.no_clip
    draw = Drawer(model, diffusion, flags, args.images, clip, HELD_OUT_SEED)
    print(f"{args.run}: T={diffusion.num_timesteps} {flags['noise_schedule']}, {args.images} held-out images and "
          f"{args.warmup} warm-up images of {flags['image_size']}px, clip_denoised={clip}, {args.threads} threads",
          flush=True)

    steps = args.reference_steps
    reference, seconds = draw("dpmpp_3m", steps, "logsnr_uniform")
    coarser, _ = draw("dpmpp_3m", steps // 2, "logsnr_uniform")
    whole_chain, _ = draw("dpmpp_3m", steps, times=whole_chain_logsnr_times(diffusion, steps))
    ddim_all, _ = draw("ddim", diffusion.num_timesteps)
    ref = {"sampler": "dpmpp_3m", "steps": steps, "rmse_to_half_as_many_steps": rmse(reference, coarser),
           "whole_chain_rmse": rmse(whole_chain, reference), "ddim_all_steps_rmse": rmse(ddim_all, reference),
           "seconds_per_image": seconds / args.images}
    floor = ref["rmse_to_half_as_many_steps"]
    print(f"reference: dpmpp_3m, {steps} steps uniform in log-SNR; RMSE to {steps // 2} steps {floor:.2g}, to the "
          f"same solve from step K-1 {ref['whole_chain_rmse']:.2g}, to DDIM with all {diffusion.num_timesteps} steps "
          f"{ref['ddim_all_steps_rmse']:.3g}", flush=True)
    start = time.perf_counter()
    tuned, cost = tune(model, diffusion, flags, args, clip)
    cost["seconds"] = time.perf_counter() - start
    print(f"tuning: {len(tuned)} schedules on {args.warmup} warm-up images in {cost['seconds']:.0f} s", flush=True)
    report = {"run": args.run, "weights": weights_file, "images": args.images, "image_size": flags["image_size"],
              "threads": args.threads,
              "diffusion_steps": diffusion.num_timesteps, "noise_schedule": flags["noise_schedule"],
              "clip_denoised": clip, "nfe": args.nfe, "torch": torch.__version__,
              "python": platform.python_version(), "reference": ref, "tuning": cost, "results": []}
    for sampler, spacing in [("ddim", "time_uniform"), *[(s, p) for s in ODE_SAMPLERS for p in SCHEDULES]]:
        errors, times = [], []
        for nfe in args.nfe:
            if spacing == "tuned" and (sampler, nfe) not in tuned:
                errors.append(None)
                times.append(None)
                continue
            x_0, seconds = draw(sampler, nfe, spacing, times=tuned.get((sampler, nfe)) if spacing == "tuned" else None)
            errors.append(rmse(x_0, reference))
            times.append(seconds / args.images)
        row = {"sampler": sampler, "spacing": spacing, "rmse": errors, "seconds_per_image": times,
               "order": order(args.nfe, errors, floor)}
        report["results"].append(row)
        print(f"{label(row):32} " + " ".join(fmt_error(e).rjust(9) for e in errors)
              + f"   order {fmt_order(row['order'])}", flush=True)
    return report


def fmt_error(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def label(row) -> str:
    return "ddim (timestep_respacing N)" if row["sampler"] == "ddim" else f"{row['sampler']} {row['spacing']}"


def fmt_order(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def best_at(report, nfe):
    """The ODE solver row with the smallest error at ``nfe``."""
    at = report["nfe"].index(nfe)
    rows = [r for r in report["results"] if r["sampler"] != "ddim" and r["rmse"][at] is not None]
    return min(rows, key=lambda r: r["rmse"][at]), at


def goals(report) -> list[str]:
    nfe = report["nfe"]
    ddim = next(r for r in report["results"] if r["sampler"] == "ddim")
    lines = []
    for few, many in ((10, 100), (5, 50)):
        if few not in nfe or many not in nfe:
            continue
        best, at = best_at(report, few)
        ddim_error = ddim["rmse"][nfe.index(many)]
        met = best["rmse"][at] <= ddim_error
        lines.append(f"- {label(best)} at {few} NFE: {best['rmse'][at]:.3g} against DDIM at {many}: "
                     f"{ddim_error:.3g}: **{'met' if met else 'not met'}**")
    if 100 in nfe:
        best, at = best_at(report, 100)
        lines.append(f"- {label(best)} at 100 NFE: {best['rmse'][at]:.3g} against 0.1: "
                     f"**{'met' if best['rmse'][at] < 0.1 else 'not met'}**")
    tuning = report["tuning"]
    worst = max(tuning["schedules"], key=lambda c: c["fraction_of_50k_images"])
    share = 100 * worst["fraction_of_50k_images"]
    lines.append(f"- the search at {worst['sampler']} {worst['nfe']} NFE, the costliest relative to its step count: "
                 f"{worst['nfe_per_image']} evaluations per warm-up image, {share:.2g}% of drawing {LARGE_RUN:,} "
                 f"images at {worst['nfe']} NFE ({share * CLI_WARMUP / tuning['warmup_images']:.2g}% with "
                 f"tune-schedule's default {CLI_WARMUP} warm-up images), against 5%: "
                 f"**{'met' if worst['fraction_of_50k_images'] < 0.05 else 'not met'}**")
    return lines


def markdown(report) -> str:
    nfe, ref, tuning = report["nfe"], report["reference"], report["tuning"]
    settings = (
        f"Model `{report['run']}`, `{report['weights']}` (T={report['diffusion_steps']}, {report['noise_schedule']} "
        f"schedule, learned sigmas, class-conditional), {report['images']} held-out images (seed {HELD_OUT_SEED}) of "
        f"{report['image_size']}px, EMA weights, clip_denoised={str(report['clip_denoised']).lower()}, "
        f"{report['threads']} threads, torch {report['torch']}. Reference: DPM-Solver++(3M), {ref['steps']} steps "
        f"uniform in log-SNR from the grids' start. Its RMSE to the same solve with half as many steps is "
        f"{ref['rmse_to_half_as_many_steps']:.2g}; to the same solve from step K-1 (the old reference, through the "
        f"clipped step) {ref['whole_chain_rmse']:.2g}; to DDIM with all {report['diffusion_steps']} steps "
        f"{ref['ddim_all_steps_rmse']:.3g}. Tuned: `idiff tune-schedule`'s search on {tuning['warmup_images']} "
        f"warm-up images of seed {WARMUP_SEED} ({tuning['fine_points']} fine log-SNR points), for every solver at "
        f"each NFE up to {max(c['nfe'] for c in tuning['schedules'])}; all of it took {tuning['seconds']:.0f} s "
        f"(the fine reference {tuning['reference_seconds']:.0f} s).")
    lines = [
        BEGIN,
        *textwrap.wrap(settings, 115, break_on_hyphens=False),
        "",
        "RMSE to the reference on the held-out images, 0-255 pixel units; order = least-squares slope over",
        "NFE >= 10 where the error is above 3x the reference's own:",
        "",
        "| sampler | spacing | order | " + " | ".join(f"NFE {n}" for n in nfe) + " |",
        "|---|---|---|" + "---|" * len(nfe),
    ]
    for row in report["results"]:
        spacing = "IDDPM respacing" if row["sampler"] == "ddim" else row["spacing"]
        lines.append(f"| {row['sampler']} | {spacing} | {fmt_order(row['order'])} | "
                     + " | ".join(fmt_error(e) for e in row["rmse"]) + " |")
    kept = {}
    for c in tuning["schedules"]:
        kept.setdefault(c["kept"], []).append(f"{c['sampler']} {c['nfe']}")
    lines += ["", "Which candidate the search kept (on the warm-up images): "
              + "; ".join(f"{name}: {', '.join(cases)}" for name, cases in kept.items()) + "."]
    lines += ["", "Wall time per image, ms: the fastest of a sampler's schedules at each NFE (the model's evaluations",
              "dominate; on a shared machine single timings vary severalfold):", "",
              "| sampler | " + " | ".join(f"NFE {n}" for n in nfe) + " |", "|---|" + "---|" * len(nfe)]
    for sampler in dict.fromkeys(row["sampler"] for row in report["results"]):
        rows = [row["seconds_per_image"] for row in report["results"] if row["sampler"] == sampler]
        fastest = [min(t for t in times if t is not None) for times in zip(*rows)]
        lines.append(f"| {sampler} | " + " | ".join(f"{1000 * t:.0f}" for t in fastest) + " |")
    lines += ["", "Goals (held-out images):", "", *goals(report), "",
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

    styles = {"time_uniform": "-", "logsnr_uniform": "--", "karras": ":", "tuned": "-"}
    colours = {"ddim": "black", "dpmpp_2m": "tab:blue", "dpmpp_3m": "tab:red", "heun": "tab:green",
               "unipc": "tab:purple", "ipndm": "tab:orange"}
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    for row in report["results"]:
        points = [(n, e) for n, e in zip(report["nfe"], row["rmse"]) if e is not None]
        ax.loglog(*zip(*points), styles[row["spacing"]], color=colours[row["sampler"]], marker="o",
                  markersize=3, linewidth=2 if row["sampler"] == "ddim" or row["spacing"] == "tuned" else 1.0,
                  label=f"{label(row)} (order {fmt_order(row['order'])})")
    ax.axhline(report["reference"]["rmse_to_half_as_many_steps"], color="grey", linewidth=0.8,
               label="reference vs half its steps")
    ax.set_xlabel("model evaluations (NFE)")
    ax.set_ylabel("RMSE to the reference, 0-255 pixel units")
    ax.set_title(f"{report['run']}: T={report['diffusion_steps']} {report['noise_schedule']}, "
                 f"{report['images']} held-out images")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, loc="upper right", ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", help="a trained run dir (default: train jobs/demo.yaml into runs/demo)")
    parser.add_argument("--images", type=int, default=16, help="held-out images per sampler (default: 16)")
    parser.add_argument("--warmup", type=int, default=16, help="warm-up images the schedules are tuned on")
    parser.add_argument("--nfe", default=[5, 6, 8, 10, 15, 20, 50, 100],
                        type=lambda s: [int(n) for n in s.split(",")])
    parser.add_argument("--tune-max-nfe", type=int, default=20, help="tune schedules up to this NFE (default: 20)")
    parser.add_argument("--fine-points", type=int, default=100, help="the search's fine grid (default: 100)")
    parser.add_argument("--reference-steps", type=int, default=500)
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
