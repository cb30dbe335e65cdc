"""Note-dictionary cost: step time with TNF on vs off, note bytes vs gradient bytes, and a prediction for BERT-large.

    python tools/note_bench.py --ranks 2 --steps 60 --out runs/note_bench

Trains the tiny preset twice under the real `deepspeed` launcher (same seed, data and batch),
reads both runs' metrics.jsonl, and writes note_bench.json and note_bench.md into --out.
The BERT-large prediction uses the same byte formulas as the measurement:
  note read bytes / step  = reading occurrences x (W-1)/W x (8 + 4 d)   (id out, fp32 row back; masked spans read none)
  note write bytes / step = occurrences x (W-1)/W x (24 + 4 d)           (id, order key, start, fp32 note)
  gradient bytes / step   = 2 (W-1) x parameters x bytes per grad  (ring all-reduce or ZeRO reduce-scatter
                                                                     + all-gather, summed over ranks)
"""

from __future__ import annotations

import json
import statistics
import sys

import torch
from transformers import BertConfig, BertForMaskedLM

from tnf_scale.config import PRESETS, RunConfig, forwarding_parser, resolve
from tnf_scale.errors import command_line
from tnf_scale.model.tnf_bert import bert_config
from tnf_scale.reports.bench import (
    add_overwrite_flag,
    launch_pair,
    median_of,
    steady_steps,
    timing_flags,
)
from tnf_scale.run_dir import RunDir, check_out_dir


def note_bytes(reads: float, writes: float, world: int, dim: int) -> tuple[float, float]:
    """Predicted (read, write) payload bytes per step crossing between ranks, summed over ranks."""
    off_rank = (world - 1) / world
    return reads * off_rank * (8 + 4 * dim), writes * off_rank * (24 + 4 * dim)


def gradient_bytes(params: int, world: int, bytes_per_grad: int) -> float:
    """Bytes per step the gradient reduction moves between ranks, summed over ranks."""
    return 2 * (world - 1) * params * bytes_per_grad


@command_line
def main(argv: list[str] | None = None) -> int:
    parser = forwarding_parser(__doc__.splitlines()[0], "both timed runs")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the timing")
    parser.add_argument("--out", default="runs/note_bench")
    parser.add_argument("--master_port", type=int, default=29655)
    parser.add_argument(
        "--rare_per_sequence",
        type=float,
        default=1.0,
        help="rare occurrences per 128-token sequence assumed for BERT-large on Wikipedia + BookCorpus "
        "(the paper: about 20%% of sentences hold a rare word; a 128-token sequence holds about five)",
    )
    add_overwrite_flag(parser)
    args, extra = parser.parse_known_args(argv)
    out = check_out_dir(args.out, "--out")
    out.mkdir(parents=True, exist_ok=True)

    flags = [*timing_flags("tiny", args.steps), *extra]
    runs = dict(zip(("off", "on"), launch_pair(out, args.ranks, args.master_port, flags, args.overwrite)))
    step_s = {tnf: median_of(steady_steps(d, args.warmup), "step_seconds") for tnf, d in runs.items()}
    on = steady_steps(runs["on"], args.warmup)
    phases = {
        tnf: {k: median_of(steady_steps(d, args.warmup), k) for k in on[0] if k.startswith("time_")}
        for tnf, d in runs.items()
    }
    tiny = RunConfig()
    params = parameter_count(BertConfig.from_json_file(str(RunDir(runs["on"]).model_config)))
    measured = {
        "ranks": args.ranks,
        "steps": args.steps,
        "warmup_excluded": args.warmup,
        "step_seconds_tnf_off": step_s["off"],
        "step_seconds_tnf_on": step_s["on"],
        "tnf_overhead": step_s["on"] / step_s["off"] - 1,
        "phases_tnf_off": phases["off"],
        "phases_tnf_on": phases["on"],
        "occurrences_per_step": statistics.mean(r["notes_written"] for r in on),
        "reads_per_step": statistics.mean(r["occurrences_read"] for r in on),
        "note_read_bytes_per_step": statistics.mean(r["note_read_bytes_sent"] for r in on),
        "note_write_bytes_per_step": statistics.mean(r["note_write_bytes_sent"] for r in on),
        "gradient_bytes_per_step": gradient_bytes(params, args.ranks, 4),
        "parameters": params,
    }
    measured["predicted_note_bytes_per_step"] = sum(
        note_bytes(measured["reads_per_step"], measured["occurrences_per_step"], args.ranks, tiny.hidden_size)
    )
    large = PRESETS["bert-large"]
    large_params = parameter_count(bert_config(resolve("bert-large", {}), large["vocab_size"]))
    predictions = []
    for world in (8, 64, 512):
        for batch in sorted({large["global_batch_size"], 32 * world}):
            occ = batch * args.rare_per_sequence * large["max_seq_len"] / 128
            read, write = note_bytes(occ, occ, world, large["hidden_size"])  # every occurrence reading: an upper bound
            grads = gradient_bytes(large_params, world, 2)
            predictions.append(
                {
                    "gpus": world,
                    "global_batch": batch,
                    "note_read_MB": read / 1e6,
                    "note_write_MB": write / 1e6,
                    "gradient_GB": grads / 1e9,
                    "note_share_of_gradient": (read + write) / grads,
                    "note_MB_per_rank": (read + write) / world / 1e6,
                }
            )
    report = {
        "measured": measured,
        "bert_large_predicted": predictions,
        "bert_large_parameters": large_params,
        "rare_per_sequence": args.rare_per_sequence,
        "command": " ".join(["python", "tools/note_bench.py", *(argv or sys.argv[1:])]),
    }
    (out / "note_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "note_bench.md").write_text(render(report))
    print(render(report))
    return 0


def parameter_count(config: BertConfig) -> int:
    """Parameters of a BertForMaskedLM of this shape (built on the meta device: no memory used)."""
    with torch.device("meta"):
        model = BertForMaskedLM(config)
    return sum(p.numel() for p in model.parameters())


def render(report: dict) -> str:
    m = report["measured"]
    lines = [
        f"Measured: tiny preset, {m['ranks']} ranks, {m['steps']} steps (first {m['warmup_excluded']} left "
        f"out), `{report['command']}`",
        "",
        "| | TNF off | TNF on |",
        "| --- | --- | --- |",
        f"| median step time | {m['step_seconds_tnf_off'] * 1000:.1f} ms | "
        f"{m['step_seconds_tnf_on'] * 1000:.1f} ms ({100 * m['tnf_overhead']:+.1f}%) |",
        *(
            f"| median {phase.removeprefix('time_')} | {1000 * m['phases_tnf_off'][phase]:.1f} ms | "
            f"{1000 * m['phases_tnf_on'][phase]:.1f} ms |"
            for phase in m["phases_tnf_on"]
        ),
        "",
        f"Per step with TNF: {m['occurrences_per_step']:.0f} rare occurrences ({m['reads_per_step']:.0f} "
        f"reading); note bytes between ranks "
        f"{m['note_read_bytes_per_step'] / 1e3:.1f} kB read + {m['note_write_bytes_per_step'] / 1e3:.1f} kB write "
        f"(formula: {m['predicted_note_bytes_per_step'] / 1e3:.1f} kB) vs "
        f"{m['gradient_bytes_per_step'] / 1e6:.1f} MB of fp32 gradients "
        f"({m['parameters']:,} parameters).",
        "",
        f"Predicted for BERT-large ({report['bert_large_parameters']:,} parameters, bf16 gradients, d = 1024, "
        f"{report['rare_per_sequence']} rare occurrence per 128-token sequence):",
        "",
        "| GPUs | global batch | note read MB | note write MB | gradient GB | notes / gradients | note MB per rank |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in report["bert_large_predicted"]:
        lines.append(
            f"| {p['gpus']} | {p['global_batch']} | {p['note_read_MB']:.2f} | {p['note_write_MB']:.2f} | "
            f"{p['gradient_GB']:.1f} | "
            f"{p['note_share_of_gradient']:.1e} | {p['note_MB_per_rank']:.3f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
