"""Throughput report: tokens/s and samples/s, the step split into phases, model FLOPs, MFU, GPU state.

    python tools/throughput_report.py --run runs/demo                       # a finished run
    python tools/throughput_report.py --preset tiny --steps 30 --out runs/tp  # run N steps first (extra flags go to train.py)

Prints a table and writes throughput.json (and throughput.md) beside the run. MFU is against the GPU's
dense bf16 peak (looked up by its NVML name) or, on a CPU, against a matmul peak of this machine
measured in the same invocation and named as such.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tnf_scale.bench import launch_training, steady_steps  # noqa: E402
from tnf_scale.throughput import PHASES, flops_per_token, gpu_peak, gpu_state, measured_matmul_peak, summarize  # noqa: E402


def report(run: Path, warmup: int) -> dict:
    config = json.loads((run / "run_config.json").read_text())
    model = json.loads((run / "model_config.json").read_text())
    steps = steady_steps(run, warmup) or steady_steps(run, 0)
    summary = summarize(steps, config["global_batch_size"])
    flops = flops_per_token(model["num_hidden_layers"], model["hidden_size"], model["intermediate_size"],
                            config["max_seq_len"], model["vocab_size"], config["mlm_probability"])
    achieved = flops * summary["tokens_per_s"]["median"]
    gpus = gpu_state()
    if gpus["gpus"] and gpu_peak(gpus["gpus"][0]["name"]):
        peak, peak_name = gpu_peak(gpus["gpus"][0]["name"]) * len(gpus["gpus"]), f"{gpus['gpus'][0]['name']} dense bf16 peak x {len(gpus['gpus'])}"
    else:
        peak, peak_name = measured_matmul_peak(), "fp32 matmul peak of this machine, measured now"
    return {"run": str(run), "preset": config["preset"], "tnf": config["tnf"], **summary, "flops_per_token": flops,
            "achieved_flops_per_s": achieved, "peak_flops_per_s": peak, "peak": peak_name, "mfu": achieved / peak, **gpus}


def render(r: dict) -> str:
    lines = [f"Run `{r['run']}` (preset {r['preset']}, TNF {r['tnf']}), median over {r['steps']} steps:", "",
             "| figure | value |", "| --- | --- |",
             f"| tokens/s | {r['tokens_per_s']['median']:,.0f} (min {r['tokens_per_s']['min']:,.0f}, max {r['tokens_per_s']['max']:,.0f}) |",
             f"| samples/s | {r['samples_per_s']['median']:,.1f} |",
             f"| step | {1000 * r['step_seconds']:.1f} ms |",
             *(f"| {phase} | {1000 * r['phase_seconds'][phase]:.1f} ms |" for phase in PHASES),
             f"| model FLOPs / token | {r['flops_per_token'] / 1e6:,.1f} M |",
             f"| achieved | {r['achieved_flops_per_s'] / 1e9:,.2f} GFLOP/s |",
             f"| MFU | {100 * r['mfu']:.1f}% of {r['peak_flops_per_s'] / 1e9:,.1f} GFLOP/s ({r['peak']}) |",
             f"| GPUs | {r['note']} |"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a finished run's output_dir")
    parser.add_argument("--preset", help="train this preset first (with --steps, --out)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="runs/throughput")
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--master_port", type=int, default=29691)
    args, extra = parser.parse_known_args(argv)
    if (args.run is None) == (args.preset is None):
        parser.error("give either --run RUN_DIR or --preset P (with --steps and --out)")
    run = Path(args.run) if args.run else launch_training(
        Path(args.out), args.ranks, args.master_port,
        ["--preset", args.preset, "--max_steps", str(args.steps), "--eval_interval", str(10 * args.steps), "--export", "false", *extra])
    result = report(run, args.warmup)
    (run / "throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    (run / "throughput.md").write_text(render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
