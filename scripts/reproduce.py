"""Regenerate the tables and figures of docs/RESULTS.md: one command, resumable.

Each name below is one table (and figure) in docs/results/, made by scripts/compare.py with the
arguments listed here, on the seeds docs/results/PLAN.md fixes for the paper's experiment. Runs
already finished by the current code are kept (compare.py checks each run's code digest), so an
interrupted regeneration continues where it stopped; a table never mixes code versions.

    python -m scripts.reproduce                   # every table, in the order below
    python -m scripts.reproduce e1_reference      # one of them
    python -m scripts.reproduce --list            # the names and their compare.py arguments

About 6 minutes per EZPoints run on one thread, two runs at a time on two cores: E1 and E2 are
32 runs each (plus 8 warm starts), E4 16, numberline_8seeds 16.
"""
import os
import sys

from plumbing.flags import parse_dataclass
from scripts import compare

# The reference's semantics (docs/ALGORITHM.md §6), as E1 of docs/results/PLAN.md runs them.
REFERENCE = ("--critic shared --critic-max-grad-norm 0.01 --no-value-norm --critic-lr 3e-5 "
             "--value-clip 0.1 --value-target shaped --merge-snapshot epoch --merge-weights sma "
             "--sft-batch replay --temperature 0.2 --target-kl 0 --lr 3e-5")
PAPER_SEEDS = ["--first-seed", "100", "--seeds", "8", "--updates", "50", "--eval-episodes", "128"]
FOUR_ARMS = ["--methods", "none,kl,static,sft", "--variants", "static=kl --merge-every 0"]

EXPERIMENTS = {
    # docs/results/PLAN.md, E1: the paper's setting at toy scale
    "e1_reference": ["--envs", "gtr/EZPoints-v0", *PAPER_SEEDS, *FOUR_ARMS,
                     "--warmup-flags", "--temperature 0.2", "--train-flags", REFERENCE],
    # E2: the same arms with this repository's defaults
    "e2_defaults": ["--envs", "gtr/EZPoints-v0", *PAPER_SEEDS, *FOUR_ARMS],
    # E4: the stress setting, lr 1e-4 without the early stop
    "e4_stress": ["--envs", "gtr/EZPoints-v0", *PAPER_SEEDS, "--methods", "none,kl",
                  "--train-flags", "--lr 1e-4 --target-kl 0"],
    # The default environment's warm starts over 8 seeds, and RL from them
    "numberline_8seeds": ["--envs", "gtr/NumberLine-v0", "--methods", "none,kl", "--seeds", "8",
                          "--updates", "50", "--eval-episodes", "128"],
}


def main(argv):
    if "--list" in argv:
        for name, arguments in EXPERIMENTS.items():
            print(name, " ".join(arguments))
        return
    unknown = [name for name in argv if name not in EXPERIMENTS]
    if unknown:
        sys.exit(f"unknown table(s) {', '.join(unknown)}; choose among {', '.join(EXPERIMENTS)}"
                 " (--list shows their arguments)")
    docs = os.path.join(compare.ROOT, "docs", "results")
    for name in argv or list(EXPERIMENTS):
        arguments = [*EXPERIMENTS[name], "--name", name, "--docs", docs, "--out", f"runs/{name}"]
        compare.main(parse_dataclass(compare.CompareArgs, arguments, compare.__doc__))


if __name__ == "__main__":
    main(sys.argv[1:])
