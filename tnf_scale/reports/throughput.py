"""Throughput figures of runs: tokens/s over interleaved trials, the step's anatomy (its phases as shares of the step),
model FLOPs (model_flops.py), MFU, GPU state, and each run's ratio to the Hugging Face Trainer peer."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from tnf_scale.anatomy import STEP_PHASES
from tnf_scale.errors import ConfigError
from tnf_scale.model_flops import gpu_peak, run_flops_per_token
from tnf_scale.reports.bench import finished_run, steady_steps
from tnf_scale.run_dir import RunDir, machine

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def measured_matmul_peak(precision: str = "fp32", size: int = 2048, repeats: int = 10) -> float:
    """This machine's best matmul rate (FLOP/s) in `precision`, measured now: the CPU's reference for MFU."""
    a, b = torch.randn(size, size, dtype=DTYPES[precision]), torch.randn(size, size, dtype=DTYPES[precision])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def gpu_state() -> dict:
    """Name, memory and utilisation of each GPU through NVML, or a note that there is none."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as err:  # no driver, no library: there is no GPU to report
        return {"gpus": [], "note": f"no GPU: NVML is not available ({type(err).__name__})"}
    gpus = []
    for i in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(i)
        memory, util = pynvml.nvmlDeviceGetMemoryInfo(handle), pynvml.nvmlDeviceGetUtilizationRates(handle)
        name = pynvml.nvmlDeviceGetName(handle)
        gpus.append(
            {
                "name": name if isinstance(name, str) else name.decode(),
                "memory_used_gb": memory.used / 1e9,
                "memory_total_gb": memory.total / 1e9,
                "utilization_pct": util.gpu,
            }
        )
    pynvml.nvmlShutdown()
    return {"gpus": gpus, "note": f"{len(gpus)} GPU(s) seen by NVML"}


def spread(values: list[float]) -> dict[str, float]:
    """The median, least and largest of `values`."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def phase_anatomy(step_seconds: list[float], phase_seconds: dict[str, list[float]]) -> dict:
    """Each phase's mean seconds per step and its share of the steps' total time, `rest` being what no phase holds.

    Shares are of totals, not of medians: a median phase over a median step can add up to more than the whole."""
    mean_step = statistics.mean(step_seconds)
    means = {p: statistics.mean(seconds) for p, seconds in phase_seconds.items()}
    means["rest"] = max(mean_step - sum(means.values()), 0.0)
    return {"phase_seconds": means, "phase_shares": {p: mean / mean_step for p, mean in means.items()}}


def phase_cell(anatomy: dict, name: str) -> str:
    """One phase of an anatomy as a table cell: its mean milliseconds per step and its share of the step."""
    return f"{1000 * anatomy['phase_seconds'][name]:.1f} ms ({100 * anatomy['phase_shares'][name]:.1f}%)"


def summarize(steps: list[dict], samples_per_step: int) -> dict:
    """Median and spread (min, max) of tokens/s and samples/s, the median step, and the anatomy (phase_anatomy)."""
    step_seconds = [r["step_seconds"] for r in steps]
    return {
        "steps": len(steps),
        "tokens_per_s": spread([r["tokens_per_s"] for r in steps]),
        "samples_per_s": spread([samples_per_step / s for s in step_seconds]),
        "step_seconds": statistics.median(step_seconds),
        **phase_anatomy(step_seconds, {p: [r.get(f"time_{p}", 0.0) for r in steps] for p in STEP_PHASES}),
    }


def device_peak(precisions: set[str]) -> dict:
    """This machine's CPU matmul peak in each of `precisions`, measured now (for runs on a CPU), and the GPU state."""
    return {
        "peaks_flops_per_s": {p: measured_matmul_peak(p) for p in sorted(precisions)},
        "peak": "CPU runs: the matmul peak of this machine in the run's precision, measured now",
        **gpu_state(),
    }


def run_peak(origin: dict, cpu_peaks: dict[str, float]) -> tuple[float | None, str]:
    """The peak a run's MFU is against, and what it is, from its provenance (`origin`): its GPUs' table peak in the
    math the run computed in x the run's ranks (the device the run recorded), or this machine's CPU peak for a CPU
    run."""
    device, ranks = origin.get("device", "cpu"), origin.get("world_size") or 1
    if device == "cpu":
        return cpu_peaks[precision_of(origin)], "CPU matmul peak, measured now"
    math = origin.get("math", precision_of(origin))
    peak = gpu_peak(device, math)
    if peak is None:
        table = "GPU_FP32_PEAK_FLOPS" if math == "fp32" else "GPU_PEAK_FLOPS"
        return None, f"no {math} peak known for {device!r}: add it to {table}"
    return peak * ranks, f"{device} dense {math} peak x {ranks}"


def precision_of(origin: dict) -> str:
    """The precision a run computed in, from its provenance (runs from before it was recorded: fp32)."""
    return origin.get("precision", "fp32")


def run_figures(trials: list[Path], warmup: int, cpu_peaks: dict[str, float]) -> dict:
    """Throughput figures of one arm (train.py's or the Hugging Face Trainer peer's), over the steady steps of all its
    `trials` (runs trained alike), with each trial's median tokens/s.

    FLOPs count the MLM head on masked tokens for every trainer: the work the objective needs.
    """
    for run in trials:
        if not RunDir(run).run_config.is_file():
            raise ConfigError(
                f"{run} has no {RunDir(run).run_config.name}, which says what it trained; time a run of ours."
            )
    run = trials[0]
    config = RunDir(run).read_run_config()
    per_trial = [steady_steps(trial, warmup) for trial in trials]
    for trial, steps in zip(trials, per_trial):
        if not steps:
            logged = len(steady_steps(trial, 0))
            raise ConfigError(
                f"--warmup {warmup} leaves none of the {logged} logged steps of {trial} to time; "
                + (f"use a warmup below {logged}." if logged else "the run logged no training step yet.")
            )
    steps = [record for trial in per_trial for record in trial]
    summary = summarize(steps, config["global_batch_size"])
    flops = run_flops_per_token(run, config["max_seq_len"], config["mlm_probability"])
    achieved = flops * summary["tokens_per_s"]["median"]
    origin = RunDir(run).read_provenance()
    peak, peak_source = run_peak(origin, cpu_peaks)
    return {
        "run": str(run),
        "trials": [
            {"run": str(t), "tokens_per_s": statistics.median(r["tokens_per_s"] for r in s)}
            for t, s in zip(trials, per_trial)
        ],
        "preset": config["preset"],
        "tnf": config["tnf"],
        "precision": precision_of(origin),
        "compiled": bool(config.get("compile", False)),
        "global_batch_size": config["global_batch_size"],
        "micro_batch_size": config.get("micro_batch_size"),
        "timed_phases": any("time_forward" in r for r in steps),
        "commit": origin.get("commit", "unknown"),
        "world_size": origin.get("world_size"),
        "machine": origin.get("machine"),
        **summary,
        "flops_per_token": flops,
        "achieved_flops_per_s": achieved,
        "device": origin.get("device", "cpu"),
        "peak_flops_per_s": peak,
        "peak": peak_source,
        "mfu": achieved / peak if peak else None,
        "memory_max_rank_gib": max((r.get("memory_max_rank_gib", 0.0) for r in steps), default=None),
    }


def peer_ratio(run: dict, peer: dict) -> dict[str, float]:
    """A run's tokens/s over the peer's: of the medians over all timed steps, and the spread of the trial-by-trial
    ratios (trial i of the run against trial i of the peer, trained next to it)."""
    pairs = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(run["trials"], peer["trials"])]
    return {**spread(pairs), "median": run["tokens_per_s"]["median"] / peer["tokens_per_s"]["median"]}


def render(report: dict) -> str:
    """The report as a markdown table, one column per run (the peer last), with the ratio to the peer."""
    runs, peer = report["runs"], report["peer"]
    columns = [*runs, peer] if peer else runs

    def row(name: str, cell) -> str:
        return f"| {name} | " + " | ".join(cell(r) for r in columns) + " |"

    def phase(r: dict, name: str) -> str:
        return phase_cell(r, name) if r["timed_phases"] else "n/a"

    machines = sorted({r["machine"] or "unrecorded" for r in columns})
    trials = max(len(r["trials"]) for r in columns)
    lines = [
        f"Trained on: {'; '.join(machines)}. Median over the steady steps (warm-up excluded) of "
        + (f"{trials} trials per trainer, trained in turn (A B, B A, ...)." if trials > 1 else "one run per trainer."),
        "",
        "| | " + " | ".join(f"`{r['run']}`" for r in columns) + " |",
        "| --- |" + " --- |" * len(columns),
        row("trainer", lambda r: "Hugging Face Trainer" if r is peer else "tnf_scale"),
        row(
            "preset, TNF, precision",
            lambda r: f"{r['preset']}, {r['tnf']}, {r['precision']}" + (", compiled" if r["compiled"] else ""),
        ),
        row("ranks, commit", lambda r: f"{r['world_size'] or '?'}, {r['commit']}"),
        row("sequences per step (micro-batch)", lambda r: f"{r['global_batch_size']} ({r['micro_batch_size']})"),
        row("steps timed", lambda r: str(r["steps"])),
        row(
            "tokens/s",
            lambda r: (
                f"{r['tokens_per_s']['median']:,.0f} ({r['tokens_per_s']['min']:,.0f}..{r['tokens_per_s']['max']:,.0f})"
            ),
        ),
        *(
            [row("tokens/s of each trial", lambda r: ", ".join(f"{t['tokens_per_s']:,.0f}" for t in r["trials"]))]
            if trials > 1
            else []
        ),
        row("samples/s", lambda r: f"{r['samples_per_s']['median']:,.1f}"),
        row("step", lambda r: f"{1000 * r['step_seconds']:.1f} ms"),
        *(row(f"{name} (share of the step)", lambda r, name=name: phase(r, name)) for name in [*STEP_PHASES, "rest"]),
        row("model FLOPs / token", lambda r: f"{r['flops_per_token'] / 1e6:,.1f} M"),
        row("achieved", lambda r: f"{r['achieved_flops_per_s'] / 1e9:,.2f} GFLOP/s"),
        row("MFU", lambda r: f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"),
        row("MFU against", lambda r: r["peak"]),
        row(
            "peak memory, largest rank",
            lambda r: f"{r['memory_max_rank_gib']:.2f} GiB" if r["memory_max_rank_gib"] else "n/a",
        ),
    ]
    if peer:

        def ratio(r: dict) -> str:
            if r is peer:
                return "1.00x"
            figures = r["tokens_per_s_over_peer"]
            trials_said = f" (trials {figures['min']:.2f}..{figures['max']:.2f}x)" if len(r["trials"]) > 1 else ""
            return f"{figures['median']:.2f}x{trials_said}"

        lines.append(row("tokens/s ÷ HF Trainer", ratio))
    lines += [
        "",
        "CPU peaks measured now: "
        + ", ".join(f"{p} {v / 1e9:,.1f} GFLOP/s" for p, v in report["peaks_flops_per_s"].items())
        + f" on {report['reported_on']}. GPUs there: {report['note']}.",
    ]
    if peer:
        lines.append(
            "The Hugging Face Trainer runs stock BertForMaskedLM, whose MLM head computes logits at every position; "
            "tnf_scale computes them at masked positions only. Model FLOPs count the masked positions for both. "
            "Both drive a DeepSpeed engine from the same config; forward, backward, accumulation (bf16 gradients "
            "added into fp32), the boundary reduction and the optimizer are timed inside DeepSpeed's methods for "
            "both. A tnf_scale step is its trainer's `train_step` (data and notes included); the peer's runs from "
            "one step's end to the next (its data loading and the Trainer's own work are its `rest`)."
        )
    return "\n".join(lines) + "\n"


def check_warmup(warmup: int) -> None:
    if warmup < 0:
        raise ConfigError(f"--warmup {warmup}: give the number of first steps to leave out of the timing (0 or more).")


def write_report(runs: list[list[Path]], peer: list[Path] | None, out: Path, warmup: int) -> str:
    """Throughput of finished runs, each given as its trials (and the peer's, with the ratios); writes throughput.md,
    .json and .png into `out`."""
    check_warmup(warmup)
    runs = [[finished_run(r, "--run") for r in trials] for trials in runs]
    peer = [finished_run(r, "--peer") for r in peer] if peer else None
    for trial in peer or []:
        if not RunDir(trial).hf_trainer.is_dir():
            raise ConfigError(
                f"--peer {trial} is a run of tnf_scale's own trainer, not of the Hugging Face Trainer peer; give it "
                "with --run, or train the peer (tnf_scale/reports/hf_peer.py, or --with_peer)."
            )
    every = [r for trials in [*runs, *([peer] if peer else [])] for r in trials]
    device = device_peak({precision_of(RunDir(r).read_provenance()) for r in every})
    report = {
        "reported_on": machine(),
        **device,
        "runs": [run_figures(trials, warmup, device["peaks_flops_per_s"]) for trials in runs],
        "peer": run_figures(peer, warmup, device["peaks_flops_per_s"]) if peer else None,
    }
    if peer:
        for run in report["runs"]:
            run["tokens_per_s_over_peer"] = peer_ratio(run, report["peer"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    text = render(report)
    (out / "throughput.md").write_text(text)
    plot(report, out / "throughput.png")
    return text


def plot(report: dict, path: Path) -> Path:
    """PNG: tokens/s (median, bars from the slowest to the fastest timed step) and MFU of every run and the peer,
    side by side, titled with the preset, commit and machine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [*report["runs"], *([report["peer"]] if report["peer"] else [])]
    names = [f"{'HF Trainer' if r is report['peer'] else 'tnf_scale'}\n{precision_of(r)}, TNF {r['tnf']}" for r in rows]
    fig, (speed, mfu) = plt.subplots(1, 2, figsize=(10, 4))
    medians = [r["tokens_per_s"]["median"] for r in rows]
    spread = [
        [m - r["tokens_per_s"]["min"] for m, r in zip(medians, rows)],
        [r["tokens_per_s"]["max"] - m for m, r in zip(medians, rows)],
    ]
    speed.bar(names, medians, yerr=spread, capsize=4, color=[f"C{i}" for i in range(len(rows))])
    speed.set_ylabel("tokens/s (median; bars: slowest to fastest step)")
    mfu.bar(names, [100 * (r.get("mfu") or 0) for r in rows], color=[f"C{i}" for i in range(len(rows))])
    mfu.set_ylabel("MFU (%)")
    mfu.set_title(f"against: {rows[0].get('peak') or report.get('peak', 'an unrecorded peak')}", fontsize=8)
    commits = ", ".join(sorted({r["commit"] for r in rows}))
    steps = ", ".join(sorted({str(r["steps"]) for r in rows}))
    fig.suptitle(
        f"Throughput, preset {rows[0]['preset']}, {steps} steps timed, commit {commits}\n{report['reported_on']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
