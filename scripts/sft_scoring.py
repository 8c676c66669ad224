"""What scoring SFT targets on the prompt's key-value cache saves (targets.py).

The SFT loss scores the teacher's answers on the agent's prompts. `targets.py:score_targets`
runs each prompt again before its target; `targets.py:score_targets_on_prompt_cache` continues
from the prompt's keys and values of the agent's own pass. This times the PPO epochs of one
update (tiny model, a warm start of 60 steps so that some teacher answers parse) with no
guidance, with the cache path and with the plain path, interleaved, and prints the medians and
their ratios.

    python -m scripts.sft_scoring
"""
import dataclasses
import statistics
import time

import gymnasium as gym
import torch

from demonstrations import warm_start
from policy import ActorCritic
from rollout import Rollout
from teacher import Teacher
from plumbing.tinyvlm import build_policy
from train import actor_critic_optimizer, parse_args, ppo_update


def plain_path(self):
    """ActorCritic._checkpointing as under gradient checkpointing: targets take the plain path."""
    return True


def main():
    args = parse_args(["--lora-r", "8", "--lora-alpha", "16", "--num-envs", "8",
                       "--steps-per-update", "32", "--max-new-tokens", "48",
                       "--warmup-sft-steps", "60", "--guidance", "sft", "--target-kl", "0"])
    torch.manual_seed(0)
    policy = build_policy(args, torch.device("cpu"))
    warm_start(policy, policy, [p for p in policy.parameters() if p.requires_grad], args, 0, 1)
    policy.eval()
    optimizer = actor_critic_optimizer(policy, args)
    teacher = Teacher(policy, args)
    teacher.start(policy)
    runner = Rollout([gym.make(args.env) for _ in range(args.num_envs)], seed=0)
    batch = runner.collect(policy, args.steps_per_update // args.num_envs, args.temperature,
                           args.max_new_tokens)
    guidance = teacher.guide(policy, batch, runner.envs[0].unwrapped)
    print(f"{sum(t is not None for t in guidance.sft_targets)} of {len(guidance.sft_targets)} "
          "observations have an SFT target")
    cache_path = ActorCritic._checkpointing
    seconds = {"none": [], "cache": [], "plain": []}
    for _ in range(3):
        for path in seconds:
            ActorCritic._checkpointing = plain_path if path == "plain" else cache_path
            run = dataclasses.replace(args, guidance="none") if path == "none" else args
            start = time.perf_counter()
            ppo_update(policy, optimizer, batch, None if path == "none" else guidance, run)
            seconds[path].append(time.perf_counter() - start)
    ActorCritic._checkpointing = cache_path
    median = {path: statistics.median(times) for path, times in seconds.items()}
    print(f"PPO epochs: no guidance {median['none']:.2f} s, SFT on the prompt cache "
          f"{median['cache']:.2f} s, SFT plain {median['plain']:.2f} s; plain over cache "
          f"{median['plain'] / median['cache']:.2f}")


if __name__ == "__main__":
    main()
