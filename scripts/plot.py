"""Plot one or more runs: success, return and format validity, entropy, thought collapse (grounding
and diversity, docs/ALGORITHM.md §4.5), the teacher's KL or SFT loss, and PPO's diagnostics,
against environment steps, with the evaluations and their standard errors. Needs matplotlib
(pip install matplotlib); training never does.

    python -m scripts.plot runs/default                          # -> runs/default/plot.png
    python -m scripts.plot runs/a runs/b --out docs/a_vs_b.png   # several runs in one figure

Each run is a train.py --out folder (metrics.jsonl, eval.jsonl). Per-update values are drawn
as a trailing mean over --smooth updates (an update ends only 10-25 episodes).
"""

import json
import os
import sys
from dataclasses import dataclass

from scripts.compare import smooth

from plumbing.flags import invalid, parse_dataclass

# (title, metrics.jsonl keys drawn in that panel)
PANELS = [("success rate (training) and evaluations", ["success_rate"]),
          ("episode return", ["episode_return"]),
          ("answers that parse; that name an admissible command (Household, ALFWorld)",
           ["format_valid", "admissible"]),
          ("token entropy at the sampling T", ["entropy"]),
          ("thought collapse: facts named, pairs of states told apart",
           ["thought_grounding", "thought_diversity"]),
          ("teacher: KL estimate / SFT loss", ["teacher_kl", "sft_loss"]),
          ("PPO: approx_kl, clip and guard fractions",
           ["approx_kl", "clip_fraction", "guard_fraction"]),
          ("critic: explained variance", ["explained_variance"]),
          ("gradient norms on the LoRA weights", ["grad_norm_policy_loss", "grad_norm_value_loss"])]


@dataclass
class PlotArgs:
    out: str = ""
    """the PNG to write (default: RUN/plot.png for one run, plot.png for several)"""
    smooth: int = 5
    """trailing mean over this many updates"""


def read(run):
    """(metrics rows of the RL updates, eval rows) of a run folder."""
    metrics = os.path.join(run, "metrics.jsonl")
    if not os.path.exists(metrics):
        sys.exit(f"{run}: no metrics.jsonl there; pass a train.py --out folder")
    rows = [json.loads(line) for line in open(metrics) if line.strip()]
    evals = os.path.join(run, "eval.jsonl")
    return ([r for r in rows if r.get("phase") != "warm_start"],
            ([json.loads(line) for line in open(evals) if line.strip()]
             if os.path.exists(evals) else []))


def plot(runs, out, window):
    """Draw the runs (`figure`) into the PNG `out`."""
    figure(runs, window).savefig(out, dpi=90)
    print(f"wrote {out}")


def figure(runs, window):
    """The matplotlib figure of the runs: a panel per entry of PANELS, a line per run and key
    that its metrics hold, and the evaluations on the first panel."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("scripts/plot.py needs matplotlib, an optional extra: pip install matplotlib")
    fig, axes = plt.subplots((len(PANELS) + 1) // 2, 2, figsize=(12, 16))
    for run in runs:
        rows, evals = read(run)
        steps = [r["env_steps"] for r in rows]
        steps_per_update = steps[0] / max(rows[0]["update"], 1) if rows else 0
        for ax, (title, keys) in zip(axes.flat, PANELS):
            for key in keys:
                values = [r.get(key) for r in rows]
                if any(v is not None for v in values):
                    label = os.path.basename(os.path.normpath(run)) + (
                        "" if len(keys) == 1 else f" {key}")
                    ax.plot(steps, smooth(values, window), label=label)
            ax.set_title(title, fontsize=10)
        for e in evals:  # evaluations at their update, with +- one standard error
            axes[0][0].errorbar(e["update"] * steps_per_update, e["eval_success_rate"],
                                yerr=e["eval_success_stderr"], fmt="o", color="black", capsize=3)
    for ax in axes.flat[len(PANELS):]:  # an odd number of panels leaves one cell empty
        ax.set_axis_off()
    for ax in axes.flat:
        ax.set_xlabel("environment steps")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def main(argv):
    """The run folders come first (default runs/default), then the flags."""
    first_flag = next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))
    runs = argv[:first_flag] or ["runs/default"]
    args = parse_dataclass(PlotArgs, argv[first_flag:], __doc__)
    if args.smooth <= 0:
        invalid("smooth", args.smooth, "positive")
    plot(runs, args.out or (os.path.join(runs[0], "plot.png") if len(runs) == 1 else "plot.png"),
         args.smooth)


if __name__ == "__main__":
    main(sys.argv[1:])
