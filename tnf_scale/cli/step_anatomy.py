"""Step anatomy: tnf_scale's masked LM against stock BertForMaskedLM, in one process, on DeepSpeed engines.

    python tools/step_anatomy.py --preset bert-base --global_batch_size 64 --steps 3 --trials 2 \
        --out tools/results/anatomy

Both models are built with the same weights and wrapped in engines from the DeepSpeed config train.py builds for the
same flags (ZeRO stage, bf16 by accelerator, fused Adam); trials alternate the order (A B, B A, ...), each model
stepping the same micro-batches of the prepared corpus. Writes anatomy.md and anatomy.json into --out: each model's
step (median and spread), tokens/s and phases (forward, backward, accumulation, boundary reduction, optimizer, rest)
as shares of the step, and tnf_scale's tokens/s over the stock model's, overall and trial by trial. Extra flags go to
the run's settings (train.py's).
"""

from __future__ import annotations

import json
import shlex
import sys

from tnf_scale.config import forwarding_parser, parse_args
from tnf_scale.errors import ConfigError, command_line
from tnf_scale.reports.step_anatomy import measure, render
from tnf_scale.run_dir import check_out_dir, machine


@command_line
def main(argv: list[str] | None = None) -> int:
    parser = forwarding_parser(__doc__.splitlines()[0], "both models")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per model per trial")
    parser.add_argument("--trials", type=int, default=2, help="rounds of stepping both models, in alternating order")
    parser.add_argument("--out", default="runs/anatomy")
    args, flags = parser.parse_known_args(argv)
    if args.steps < 1 or args.trials < 1:
        raise ConfigError(f"--steps {args.steps} --trials {args.trials}: give at least one of each.")
    cfg = parse_args(flags)
    if cfg.objective != "mlm":
        raise ConfigError(f"--objective {cfg.objective}: the stock model is BERT's masked LM; time an mlm preset.")
    out = check_out_dir(args.out, "--out")
    command = shlex.join(["python", "tools/step_anatomy.py", *(argv if argv is not None else sys.argv[1:])])
    result = measure(cfg, args.trials, args.steps)
    text = render(result, machine(), command)
    out.mkdir(parents=True, exist_ok=True)
    (out / "anatomy.json").write_text(json.dumps({**result, "machine": machine(), "command": command}, indent=2) + "\n")
    (out / "anatomy.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
