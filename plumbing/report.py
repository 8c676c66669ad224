"""What a run reports: one metrics row per update, its console line, and evaluations.

Statistics are averaged over all processes (`all_mean`), so a torchrun job logs the same
numbers as one process playing all the environments; only rank 0 prints and writes.

`metrics.jsonl`: a row per update (null where nothing was measured; a warm start's row has
`"phase": "warm_start"` and its held-out SFT loss). The keys: episodes and answers
(`success_rate`, `episode_return`, `episode_length`, `episodes`, `env_steps`, `format_valid`,
`entropy`, `thought_tokens`, `opening_prob`, `admissible` on Household and ALFWorld); thought
collapse (`thought_grounding`, `thought_diversity`, §4.5); PPO's health (`approx_kl`,
`clip_fraction`, `guard_fraction`, `log_ratio_max`, `first_log_ratio_max`,
`explained_variance`, `grad_norm`, `grad_norm_critic`, `grad_norm_policy_loss`,
`grad_norm_value_loss`, `skipped_steps`, `optimizer_steps`, `adv_var_env`, `adv_var_format`,
`policy_loss`, `value_loss`, `lr`); the teacher (`teacher_kl`, `sft_loss`,
`teacher_parse_rate`, `teacher_samples`); time (`time_rollout`, `time_update`,
`time_teacher`, `time_merge`, `env_steps_per_s`). A healthy update has approx_kl 0.003-0.02,
clip fraction 0.05-0.15, guard 0; approx_kl above 0.1 announced each collapse.

Use (train.py):
    metrics = RunLog(args, world, last_update) if rank == 0 else None
    log_update(metrics, batch, guidance, logs, counters, recent, world)
    run_evaluation(policy, args, rank, world, update, metrics)    # appends to OUT/eval.jsonl
"""

import dataclasses
import json
import os

from tqdm import tqdm

from envs import extract_thoughts, thought_diversity, thought_grounding
from plumbing import checkpoint
from plumbing.distributed import all_mean
from plumbing.provenance import code_version
from rollout import evaluate


class RunLog:
    """Rank 0's record of a run: metrics.jsonl, and with --tensorboard / --wandb PROJECT the same
    numbers as scalars there, against the update (evaluations under eval/)."""

    def __init__(self, args, world, last_update):
        config = dataclasses.asdict(args) | {"world_size": world} | code_version()
        self.file = checkpoint.open_run(args.out, config, last_update)
        self.tensorboard = self.wandb = None
        if args.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(os.path.join(args.out, "tensorboard"))
        if args.wandb:
            import wandb
            self.wandb = wandb.init(project=args.wandb, dir=args.out, config=config,
                                    name=os.path.basename(args.out))

    def write(self, row, prefix=""):
        """One row: to metrics.jsonl (NaN as null: strict JSON) unless it is an evaluation
        (prefix "eval/", eval.jsonl has those), and its numbers to TensorBoard and W&B."""
        if not prefix:
            self.file.write(json.dumps({k: None if v != v else v for k, v in row.items()}) + "\n")
            self.file.flush()
        scalars = {prefix + k: v for k, v in row.items()
                   if isinstance(v, (int, float)) and v == v and k != "update"}
        if self.tensorboard:
            for name, value in scalars.items():
                self.tensorboard.add_scalar(name, value, row["update"])
        if self.wandb:
            self.wandb.log(scalars, step=row["update"])

    def close(self):
        self.file.close()
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()


def log_update(metrics, batch, guidance, logs, counters, recent, world):
    """One metrics.jsonl row (statistics averaged over all processes) and its console line.

    `metrics`: rank 0's RunLog, None on the other ranks (they only join the averages); `batch`:
    the update's rollout.Batch; `guidance`: the teacher's Guidance, None without a teacher;
    `logs`: one number per key (ppo_update's diagnostics, the timings); `counters`: "update" and
    "env_steps"; `recent`: (successes, episodes) of the last updates, appended to here.
    """
    episodes = batch.episodes
    # Thought collapse (§4.5), of this process's answers; diversity is NaN when they all replied
    # to one state.
    thoughts = [extract_thoughts(text)
                for text in batch.texts]  # None where an answer has no thoughts
    diversity = thought_diversity(thoughts, [tuple(facts) for facts in batch.facts])
    row = {"update": counters["update"], "env_steps": counters["env_steps"],
           "success_rate": all_mean([e["success"] for e in episodes], world),
           "episode_return": all_mean([e["return"] for e in episodes], world),
           "episode_length": all_mean([e["length"] for e in episodes], world),
           "episodes": int(round(all_mean([len(episodes)], world) * world)),
           "format_valid": all_mean(batch.format_valid.flatten().tolist(), world),
           "entropy": all_mean(batch.entropy.flatten().tolist(), world),
           # The format's opening token at the first answer position: it falls before parsing does.
           "opening_prob": all_mean(batch.opening_prob.flatten().tolist(), world)
           if batch.opening_prob is not None else float("nan"),
           # Household, ALFWorld: answers that named a command admissible now (NaN elsewhere).
           "admissible": all_mean(batch.admissible[~batch.admissible.isnan()].tolist(), world)
           if batch.admissible is not None else float("nan"),
           "thought_tokens": all_mean(batch.thought_tokens.flatten().tolist(), world),
           "thought_grounding": all_mean([thought_grounding(t, f)
                                          for t, f in zip(thoughts, batch.facts)], world),
           "thought_diversity": all_mean([diversity] if diversity == diversity else [], world),
           "teacher_kl": (all_mean(guidance.teacher_kl.flatten().tolist(), world)
                          if guidance else float("nan")),
           "teacher_parse_rate": (all_mean([guidance.parse_rate], world)
                                  if guidance else float("nan")),
           "teacher_samples": all_mean([guidance.samples], world) if guidance else float("nan"),
           **{k: all_mean([v], world) for k, v in logs.items()}}
    if row["episodes"]:
        recent.append((row["success_rate"] * row["episodes"], row["episodes"]))
    if metrics is None:  # not rank 0
        return
    # One update ends only ~10-25 episodes: the mean over the last 10 updates shows the trend.
    recent_success = sum(s for s, _ in recent) / max(sum(n for _, n in recent), 1)
    admissible = ""
    if row["admissible"] == row["admissible"]:  # not NaN: the environment judges commands
        admissible = f"admissible {row['admissible']:.2f} | "
    tqdm.write(f"update {row['update']:3d} | steps {row['env_steps']:6d} | "
               f"success {row['success_rate']:.2f} (last 10 updates {recent_success:.2f}) | "
               f"return {row['episode_return']:6.2f} | format {row['format_valid']:.2f} | "
               f"{admissible}entropy {row['entropy']:.3f} | kl {row['teacher_kl']:.3f} | "
               f"ev {row['explained_variance']:+.2f} | "
               f"approx_kl {row['approx_kl']:.3f} clip {row['clip_fraction']:.2f} "
               f"guard {row['guard_fraction']:.2f} | "
               f"|g| pg {row['grad_norm_policy_loss']:.2g} vf {row['grad_norm_value_loss']:.2g} | "
               f"{row['env_steps_per_s']:.1f} steps/s")
    metrics.write(row)


def admissible_share(episodes, world):
    """Share of the episodes' steps whose answer named an admissible command, over all
    processes; NaN where the environment does not judge commands."""
    flags = []  # one 0/1 per step
    for e in episodes:
        if "admissible_steps" in e:
            flags += [1.0] * e["admissible_steps"] + [0.0] * (e["length"] - e["admissible_steps"])
    return all_mean(flags, world)


def run_evaluation(policy, args, rank, world, update, log=None):
    """Success rate (with its standard error) and mean return on fresh seeds, over all ranks."""
    temperature = args.temperature if args.eval_temperature < 0 else args.eval_temperature
    # Seeds far from training's (seed + 1000 * rank + i), so evaluation deals are fresh.
    episodes = evaluate(policy, args.env, len(range(rank, args.eval_episodes, world)),
                        args.num_envs, seed=10**6 + args.seed + 1000 * rank,
                        temperature=temperature, max_new_tokens=args.max_new_tokens,
                        unparsed_action=args.unparsed_action)
    n = int(round(all_mean([len(episodes)], world) * world))
    success = all_mean([e["success"] for e in episodes], world)
    result = {"update": update, "eval_episodes": n, "eval_success_rate": success,
              "eval_success_stderr": (success * (1 - success) / max(n, 1)) ** 0.5,
              "eval_return": all_mean([e["return"] for e in episodes], world),
              "eval_temperature": temperature}
    admissible = admissible_share(episodes, world)
    commands = ""
    if admissible == admissible:  # not NaN: the environment judges commands
        result["eval_admissible"] = admissible
        commands = f" | admissible {admissible:.2f}"
    if rank == 0:
        tqdm.write(f"eval update {update}: success {success:.3f} "
                   f"+- {result['eval_success_stderr']:.3f} "
                   f"over {n} episodes | return {result['eval_return']:.2f}{commands}")
        with open(os.path.join(args.out, "eval.jsonl"), "a") as f:
            f.write(json.dumps(result) + "\n")
        if log:
            log.write(result, prefix="eval/")
    return result
