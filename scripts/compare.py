"""The paper's comparison (docs/ALGORITHM.md §4.4) at toy scale: PPO only vs GTR-Turbo SFT vs
GTR-Turbo KL.

For each environment and seed, one SFT warm start (`train.py --updates 0`) is trained and
evaluated; then each method is a `train.py` run that starts from it (`--init`), with the same
budget of environment steps and the same flags except `--guidance`. The script then reads
every run's metrics.jsonl and eval.jsonl and writes, into --docs, a Markdown table and a PNG
figure whose file names are --name with .md and .png added:
  the table       final success (mean +- standard error over seeds), return, training success,
                  format validity and thought collapse (grounding and diversity of the
                  thoughts, docs/ALGORITHM.md §4.5) over the first and last quarter of RL,
                  entropy at the start / middle / end of RL, time per update, the share of
                  admissible commands (Household) after the warm start and RL; a row per seed
  the figure      training success, format validity, token entropy, thought grounding and
                  thought diversity (and admissible commands on Household) against env steps
                  (needs matplotlib: pip install matplotlib; training does not)

    python -m scripts.compare                     # every run, table, figure
    python -m scripts.compare --report-only       # table and figure from the runs already in --out
    python -m scripts.compare --seeds 1 --envs gtr/NumberLine-v0 --updates 4     # a quick look
    python -m scripts.compare --methods none --envs gtr/NumberLine-v0 --seeds 8 \
        --eval-episodes 128 --out runs/ppo --name ppo_numberline     # PPO alone over 8 seeds
    python -m scripts.compare --envs gtr/NumberLine-v0 --methods kl,sma \
        --variants "sma=kl --merge-weights sma"
                                              # an ablation: each variant is a method with its flags

Finished runs (their final eval line written) of the current code are kept, so an interrupted
comparison continues where it stopped. A run made by other code (its config.json's code digest,
plumbing/provenance.py) is run again, and so are the runs that start from a warm start run
again: a table never pairs the runs of one version with the warm starts of another.
"""

import json
import math
import os
import subprocess
import sys
import time
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from plumbing.flags import invalid, parse_dataclass
from plumbing.provenance import code_digest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CODE_DIGEST = code_digest()  # the code this comparison's runs must have been made by

METHODS = {"none": "PPO only (RL4VLM)", "sft": "GTR-Turbo SFT", "kl": "GTR-Turbo KL"}


@dataclass
class CompareArgs:
    envs: str = "gtr/NumberLine-v0,gtr/EZPoints-v0"
    """comma-separated environments"""
    methods: str = "none,sft,kl"
    """comma-separated --guidance values, or names of --variants"""
    variants: str = ""
    """ablations: 'name=guidance flags...' separated by ';',
    e.g. 'sma=kl --merge-weights sma; static=kl --merge-every 0'"""
    seeds: int = 3
    """seeds per method and environment (--first-seed, --first-seed + 1, ...)"""
    first_seed: int = 0
    """the first seed"""
    updates: int = 25
    """PPO updates per run (the budget: updates x steps-per-update environment steps)"""
    warmup_flags: str = ""
    """train.py flags of the warm start shared by the methods of one seed"""
    train_flags: str = ""
    """further train.py flags shared by every RL run"""
    eval_episodes: int = 64
    """evaluation episodes (sampled at the training temperature) after the warm start and RL"""
    jobs: int = 2
    """runs at a time (each gets cores / jobs threads)"""
    out: str = "runs/compare"
    """folder of the runs (OUT/<env>/<method>/seed<N>)"""
    docs: str = os.path.join(ROOT, "docs", "results")
    """the folder the table and the figure go to"""
    name: str = "comparison"
    """file name (without extension) of the table and the figure"""
    report_only: bool = False
    """do not train; report the runs already in --out"""


def variants(args):
    """{name: (guidance, [train.py flags])} of --variants."""
    parsed = {}
    for spec in filter(str.strip, args.variants.split(";")):
        name, _, command = spec.partition("=")
        guidance, *flags = command.split()
        if not name.strip() or guidance not in METHODS:
            sys.exit(f"--variants: {spec.strip()!r} must read 'name=guidance flags...' with a "
                     f"guidance among {', '.join(METHODS)}")
        parsed[name.strip()] = (guidance, flags)
    return parsed


def label(args, method):
    """A method's name in tables and figures: the paper's, or the variant's flags."""
    if method in METHODS:
        return METHODS[method]
    guidance, flags = variants(args)[method]
    return ", ".join([METHODS[guidance], *([" ".join(flags)] if flags else [])])


def seed_list(args):
    """The seeds of the comparison."""
    return list(range(args.first_seed, args.first_seed + args.seeds))


def run_dir(args, env, method, seed):
    """OUT/<env>/<method>/seed<N>; method "warm" is the seed's shared warm start."""
    return os.path.join(args.out, env.split("/")[-1], method, f"seed{seed}")


def finished(path, updates, after=0.0, digest=CODE_DIGEST):
    """A run is done when its evaluation after the last update is written, by the code of
    `digest` (its config.json's code digest; None: any code), later than `after` (its warm
    start's end, a time stamp)."""
    evals, config = os.path.join(path, "eval.jsonl"), os.path.join(path, "config.json")
    if not (os.path.exists(evals) and os.path.exists(config)) or os.path.getmtime(evals) < after:
        return False
    if digest is not None and run_config(path).get("code_digest") != digest:
        return False
    return any(json.loads(line)["update"] == updates for line in open(evals))


def run_config(path):
    """A run's config.json (train.py's flags, its code digest and commit, its world size)."""
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


# Two-sided 95 % quantiles of Student's t for 1-30 degrees of freedom (the normal's beyond).
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def paired_difference(differences):
    """'mean +- se [low, high]' of per-seed differences: the 95 % t-interval with n - 1 degrees
    of freedom, the test of docs/results/PLAN.md (a difference is resolved when it excludes 0)."""
    mean, se = mean_se(differences)
    n = len([d for d in differences if d is not None])
    if n < 2:
        return f"{mean:+.3f} (n = {n})"
    t = T_975[n - 2] if n - 1 <= len(T_975) else 1.960
    return f"{mean:+.3f} +- {se:.3f} [{mean - t * se:+.3f}, {mean + t * se:+.3f}]"


def usable_cores():
    """The cores this process may run on (`taskset` narrows them; macOS only knows them all)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def train(args, env, method, seed, threads):
    """One train.py run in a subprocess with `threads` CPU threads; skipped when already done."""
    path = run_dir(args, env, method, seed)
    common = [sys.executable, os.path.join(ROOT, "train.py"), "--env", env, "--seed", str(seed),
              "--out", path, "--eval-episodes", str(args.eval_episodes)]
    if method == "warm":
        updates, cmd = 0, common + ["--updates", "0", *args.warmup_flags.split()]
    else:
        init = os.path.join(run_dir(args, env, "warm", seed), "checkpoint", "adapters", "policy")
        guidance, flags = variants(args).get(method, (method, []))
        updates, cmd = args.updates, common + ["--guidance", guidance, "--init", init,
                                               "--warmup-sft-steps", "0",
                                               "--updates", str(args.updates),
                                               *args.train_flags.split(), *flags]
    warm_evals = os.path.join(run_dir(args, env, "warm", seed), "eval.jsonl")
    after = 0.0 if method == "warm" else os.path.getmtime(warm_evals)
    if finished(path, updates, after):
        return path
    os.makedirs(path, exist_ok=True)
    environ = dict(os.environ, OMP_NUM_THREADS=str(threads))
    start = time.perf_counter()
    with open(os.path.join(path, "log.txt"), "w") as log:
        # From scratch: a run killed half-way is restarted, not resumed with other timings.
        result = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=environ)
    if result.returncode:
        sys.exit(f"{' '.join(cmd)} failed (exit {result.returncode}); see {path}/log.txt")
    print(f"{env} {method} seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    return path


def read_run(path, with_warm_start=False):
    """(metrics rows, eval rows) of a run; the warm start's row only when asked for."""
    rows = [json.loads(line) for line in open(os.path.join(path, "metrics.jsonl"))]
    evals = [json.loads(line) for line in open(os.path.join(path, "eval.jsonl"))]
    return [r for r in rows if with_warm_start or r.get("phase") != "warm_start"], evals


def mean_se(values):
    """Mean and standard error over seeds."""
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def quarters(rows, key):
    """Mean of `key` over the first and over the last quarter of a run's updates (NaN where a run
    predates the key)."""
    q = max(1, len(rows) // 4)
    return mean_se([r.get(key) for r in rows[:q]])[0], mean_se([r.get(key) for r in rows[-q:]])[0]


def pair(per_seed):
    """'first +- se / last +- se' over seeds of (first, last) pairs."""
    (first, first_se), (last, last_se) = (mean_se([p[0] for p in per_seed]),
                                          mean_se([p[1] for p in per_seed]))
    return f"{first:.3f} +- {first_se:.3f} / {last:.3f} +- {last_se:.3f}"


def smooth(values, window=5):
    """Trailing moving average; None (no episode ended in that update) is skipped."""
    out = []
    for i in range(len(values)):
        recent = [v for v in values[max(0, i - window + 1): i + 1] if v is not None]
        out.append(sum(recent) / len(recent) if recent else float("nan"))
    return out


def provenance(args, envs, methods):
    """Which code made the table's runs, on what machine, and the commands that regenerate them
    ({seed} for the seed). Stops when the runs were made by more than one version of the code."""
    configs = [run_config(run_dir(args, env, m, s)) for env in envs for m in ["warm", *methods]
               for s in seed_list(args) if os.path.exists(os.path.join(run_dir(args, env, m, s),
                                                                       "config.json"))]
    versions = {(c.get("code_digest"), c.get("commit")) for c in configs}
    if len(versions) > 1:
        sys.exit(f"the runs in {args.out} were made by {len(versions)} versions of the code; "
                 "a table reports one: rerun the stale ones (without --report-only)")
    digest, commit = versions.pop() if versions else (None, None)
    dates = sorted(time.strftime("%Y-%m-%d", time.gmtime(os.path.getmtime(os.path.join(
        run_dir(args, env, m, s), "eval.jsonl")))) for env in envs for m in ["warm", *methods]
                   for s in seed_list(args)
                   if os.path.exists(os.path.join(run_dir(args, env, m, s), "eval.jsonl")))
    seeds = seed_list(args)
    flags = []
    for field in dataclasses.fields(CompareArgs):  # the flags that differ from the defaults
        value = getattr(args, field.name)
        if field.name not in ("report_only", "docs", "jobs") and value != field.default:
            quoted = f"'{value}'" if isinstance(value, str) and " " in value else value
            flags.append(f"--{field.name.replace('_', '-')} {quoted}")
    command = "python -m scripts.compare " + " ".join(flags)
    return (f"Code: commit {commit or 'not recorded'} (code digest {str(digest)[:12]}). "
            f"Runs finished {dates[0] if dates else '?'} to {dates[-1] if dates else '?'}, on "
            f"{usable_cores()} CPU cores with {max(1, usable_cores() // args.jobs)} thread(s) a "
            f"run, {args.jobs} at a time; torch {torch_version()}. Seeds {seeds[0]}-{seeds[-1]}."
            f" Command (each seed's train.py commands are in its runs' config.json):\n\n"
            f"    {command}\n\n")


def torch_version():
    """The installed torch's version, without importing it (a second of start-up)."""
    from importlib.metadata import version
    return version("torch")


def report(args, envs, methods):
    """Both tables from the finished runs. A seed counts once all its methods have finished, so
    every row compares the methods on the same seeds (an interrupted comparison reports the
    rest)."""
    lines = ["| environment | method | seeds | success after warm start | final success | "
             "final return | train success: first / last quarter | "
             "format valid: first / last quarter | thought grounding: first / last quarter | "
             "thought diversity: first / last quarter | entropy: first / middle / last update | "
             "s per update | teacher: parsed / answers sampled per observation | "
             "final success minus the first method's, paired over seeds: mean +- se "
             "[95 % t-interval] | "
             "explained variance: first / last quarter | opening token's probability: first / "
             "last quarter | admissible commands: after warm start / final |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    per_seed = ["| environment | method | seed | warm start: held-out SFT loss | "
                "success after warm start | final success | train success: first / last quarter | "
                "format valid: first / last quarter | thought grounding: first / last quarter | "
                "thought diversity: first / last quarter | "
                "explained variance: first / last quarter |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
    pairs = ["| environment | difference of final success | seeds | mean +- se [95 % t-interval] |",
             "|---|---|---|---|"]
    curves, digest = {}, None if args.report_only else CODE_DIGEST
    for env in envs:
        seeds = [s for s in seed_list(args)
                 if finished(run_dir(args, env, "warm", s), 0, 0.0, digest)
                 and all(finished(run_dir(args, env, m, s), args.updates, 0.0, digest)
                         for m in methods)]
        if not seeds:
            print(f"{env}: no seed with every method finished yet")
            continue
        warm = {s: read_run(run_dir(args, env, "warm", s), with_warm_start=True) for s in seeds}
        start = mean_se([warm[s][1][-1]["eval_success_rate"] for s in seeds])
        # None where the environment does not judge commands
        start_admissible = mean_se([warm[s][1][-1].get("eval_admissible") for s in seeds])[0]
        finals = {}
        for method in methods:
            runs = [read_run(run_dir(args, env, method, s)) for s in seeds]
            finals[method] = [evals[-1]["eval_success_rate"] for _, evals in runs]
            final = mean_se(finals[method])
            ret = mean_se([evals[-1]["eval_return"] for _, evals in runs])
            admissible = mean_se([evals[-1].get("eval_admissible") for _, evals in runs])[0]
            commands = ("" if math.isnan(admissible)  # an environment that does not judge them
                        else f"{start_admissible:.3f} / {admissible:.3f}")
            # per seed: (first, last)
            success = [quarters(rows, "success_rate") for rows, _ in runs]
            valid = [quarters(rows, "format_valid") for rows, _ in runs]
            grounding = [quarters(rows, "thought_grounding") for rows, _ in runs]
            diversity = [quarters(rows, "thought_diversity") for rows, _ in runs]
            variance = [quarters(rows, "explained_variance") for rows, _ in runs]
            opening = [quarters(rows, "opening_prob") for rows, _ in runs]
            entropy = [mean_se([rows[i]["entropy"] for rows, _ in runs])[0]
                       for i in (0, len(runs[0][0]) // 2, len(runs[0][0]) - 1)]
            seconds = mean_se([sum(r["time_rollout"] + r["time_teacher"] + r["time_update"]
                                   + r["time_merge"] for r in rows) / len(rows)
                               for rows, _ in runs])
            parsed = mean_se([r.get("teacher_parse_rate") for rows, _ in runs for r in rows])[0]
            sampled = mean_se([r.get("teacher_samples") for rows, _ in runs for r in rows])[0]
            # The methods of a seed share its warm start: their difference per seed is the sharp
            # measure.
            paired = paired_difference([f - b for f, b in zip(finals[method],
                                                               finals[methods[0]])])
            lines.append(f"| {env.split('/')[-1]} | {label(args, method)} | {len(seeds)} | "
                         f"{start[0]:.3f} +- {start[1]:.3f} | "
                         f"**{final[0]:.3f} +- {final[1]:.3f}** | {ret[0]:.2f} +- {ret[1]:.2f} | "
                         f"{pair(success)} | {pair(valid)} | {pair(grounding)} | "
                         f"{pair(diversity)} | {' / '.join(f'{e:.3f}' for e in entropy)} | "
                         f"{seconds[0]:.1f} | {parsed:.3f} / {sampled:.2f} | "
                         f"{paired} | {pair(variance)} | "
                         f"{pair(opening)} | {commands} |")
            curves[env, method] = runs
            for i, s in enumerate(seeds):
                loss = warm[s][0][0]["warmup_loss_after"]
                per_seed.append(f"| {env.split('/')[-1]} | {label(args, method)} | {s} | "
                                f"{loss:.3f} | {warm[s][1][-1]['eval_success_rate']:.3f} | "
                                f"{finals[method][i]:.3f} | "
                                f"{success[i][0]:.3f} / {success[i][1]:.3f} | "
                                f"{valid[i][0]:.3f} / {valid[i][1]:.3f} | "
                                f"{grounding[i][0]:.3f} / {grounding[i][1]:.3f} | "
                                f"{diversity[i][0]:.3f} / {diversity[i][1]:.3f} | "
                                f"{variance[i][0]:.3f} / {variance[i][1]:.3f} |")
        # Each method against its warm start, and every pair of methods, paired by seed
        # (docs/results/PLAN.md's test).
        for method in methods:
            differences = [f - warm[s][1][-1]["eval_success_rate"]
                           for f, s in zip(finals[method], seeds)]
            pairs.append(f"| {env.split('/')[-1]} | {label(args, method)} minus its warm start | "
                         f"{len(seeds)} | {paired_difference(differences)} |")
        for i, first in enumerate(methods):
            for second in methods[i + 1:]:
                differences = [b - a for a, b in zip(finals[first], finals[second])]
                pairs.append(f"| {env.split('/')[-1]} | {label(args, second)} minus "
                             f"{label(args, first)} | {len(seeds)} | "
                             f"{paired_difference(differences)} |")
    if not curves:
        sys.exit("no finished comparison runs to report")
    rows, evals = next(iter(curves.values()))[0]
    warm_start = "train.py's default"
    if args.warmup_flags:
        warm_start = f"train.py's, with `{args.warmup_flags}`"
    header = (f"Per seed one warm start ({warm_start}) that every method starts from, "
              f"then {args.updates} updates of {rows[0]['env_steps']} environment steps. "
              f"Success is sampled at T = {evals[-1]['eval_temperature']} over "
              f"{evals[-1]['eval_episodes']} fresh episodes per seed "
              f"(mean +- standard error over seeds). Further flags of every RL run: "
              f"`{args.train_flags or 'none'}`.\n\n")
    text = (header + provenance(args, envs, methods) + "\n".join(lines)
            + "\n\nPaired by seed (a difference is resolved when its interval excludes 0):\n\n"
            + "\n".join(pairs) + "\n\nPer seed:\n\n" + "\n".join(per_seed) + "\n")
    with open(os.path.join(args.docs, f"{args.name}.md"), "w") as f:
        f.write(text)
    print(text)
    plot(args, envs, methods, curves)


def plot(args, envs, methods, curves):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed (pip install matplotlib): no {args.name}.png")
        return
    envs = [env for env in envs if (env, methods[0]) in curves]
    labels = {"success_rate": "training success rate (5-update mean)",
              "format_valid": "answers that parse (5-update mean)",
              "entropy": "token entropy at the sampling T",
              "thought_grounding": "thought grounding: facts named (5-update mean)",
              "thought_diversity": "thought diversity: pairs told apart (5-update mean)"}
    judged = [r.get("admissible") is not None
              for runs in curves.values() for rows, _ in runs for r in rows]
    if any(judged):  # Household, ALFWorld
        labels["admissible"] = "answers naming an admissible command (5-update mean)"
    keys = list(labels)
    fig, axes = plt.subplots(len(keys), len(envs), figsize=(5 * len(envs), 3.2 * len(keys)),
                             squeeze=False)
    for col, env in enumerate(envs):
        for method in methods:
            runs = curves[env, method]
            steps = [r["env_steps"] for r in runs[0][0]]
            for row, key in enumerate(keys):
                per_seed = [smooth([r.get(key) for r in rows]) for rows, _ in runs]
                mean = [mean_se(v)[0] for v in zip(*per_seed)]
                se = [0.0 if math.isnan(s) else s for s in (mean_se(v)[1] for v in zip(*per_seed))]
                # a variant by its name: its flags are in the table
                line, = axes[row][col].plot(steps, mean, label=METHODS.get(method, method))
                axes[row][col].fill_between(steps, [m - s for m, s in zip(mean, se)],
                                            [m + s for m, s in zip(mean, se)],
                                            color=line.get_color(), alpha=0.2)
        axes[0][col].set_title(env.split("/")[-1])
        for row, key in enumerate(keys):
            axes[row][col].set_ylabel(labels[key])
        axes[-1][col].set_xlabel("environment steps")
        axes[0][col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.docs, f"{args.name}.png"), dpi=100)
    print(f"wrote {os.path.join(args.docs, args.name + '.png')}")


def main(args):
    envs, methods, named = (args.envs.split(","), args.methods.split(","),
                            variants(args))  # checks --variants
    unknown = [m for m in methods if m not in METHODS and m not in named]
    if unknown:
        sys.exit(f"--methods: unknown {', '.join(unknown)}; "
                 f"choose among {', '.join([*METHODS, *named])}")
    if not args.report_only:
        threads = max(1, usable_cores() // args.jobs)
        pairs = [(env, seed) for seed in seed_list(args) for env in envs]
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda pair: train(args, pair[0], "warm", pair[1], threads), pairs))
            list(pool.map(lambda job: train(args, *job, threads),
                          [(env, method, seed) for env, seed in pairs for method in methods]))
    report(args, envs, methods)


if __name__ == "__main__":
    args = parse_dataclass(CompareArgs, sys.argv[1:], __doc__)
    for name in ("seeds", "updates", "jobs"):
        if getattr(args, name) <= 0:
            invalid(name, getattr(args, name), "positive")
    if args.eval_episodes < 0:
        invalid("eval_episodes", args.eval_episodes, "non-negative")
    main(args)
