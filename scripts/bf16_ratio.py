"""How far PPO's first ratio is from 1 in bfloat16, before any step (docs/ALGORITHM.md §6).

The rollout scores its answers in one batch of --num-envs; PPO scores the same answers with the
same weights in shuffled micro-batches, padded differently. In bfloat16 the rounding depends on
that padding. For each seed this prints the largest |log pi - log pi_old| of the lambda-weighted
sequence log-prob: rollout batch vs PPO micro-batches, two different shufflings of PPO's
micro-batches, and the same micro-batches twice (which train.py's recomputation makes of it).

    python -m scripts.bf16_ratio        # a random tiny Qwen2.5-VL, T = 0.2, micro-batches of 4
"""

import gymnasium as gym
import torch

import envs
from plumbing.loader import load_policy
from plumbing.tinyvlm import offline_model
from rollout import Rollout

TEMPERATURE, MICRO_BATCH, NUM_ENVS, STEPS, TOKENS = 0.2, 4, 8, 4, 64


@torch.no_grad()
def scored(policy, batch, order):
    """Sequence log-probs [T*N] of the rollout's answers, scored in micro-batches taken in
    `order`."""
    out = torch.zeros(len(order))
    for start in range(0, len(order), MICRO_BATCH):
        idx = order[start:start + MICRO_BATCH]
        answers = policy([batch.encoded[i] for i in idx], [batch.responses[i] for i in idx],
                         TEMPERATURE)
        out[idx] = answers["seq_logprob"].float().cpu()
    return out


def main():
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        policy = load_policy(offline_model("tiny-qwen2.5-vl"), envs.action_span,
                             dtype=torch.bfloat16, lora_r=8, lora_alpha=16)
        # an adapter that has moved from its zero start, as after a warm start
        with torch.no_grad():
            for name, p in policy.model.named_parameters():
                if "lora_" in name and ".policy." in name:
                    p.add_(0.05 * torch.randn_like(p))
        policy.eval()
        runner = Rollout([gym.make("gtr/EZPoints-v0") for _ in range(NUM_ENVS)], seed=seed)
        batch = runner.collect(policy, STEPS, TEMPERATURE, TOKENS)
        old = batch.old_logprobs.flatten()  # [T*N], scored in batches of NUM_ENVS
        first = scored(policy, batch, torch.randperm(len(old)).tolist())
        second = scored(policy, batch, torch.randperm(len(old)).tolist())
        fixed = list(range(len(old)))
        same = (scored(policy, batch, fixed) - scored(policy, batch, fixed)).abs().max()
        print(f"seed {seed}: rollout vs PPO {(first - old).abs().max():.4f} "
              f"(mean {(first - old).abs().mean():.4f}); "
              f"two shufflings {(first - second).abs().max():.4f}; "
              f"the same micro-batches twice {same:.4f}", flush=True)


if __name__ == "__main__":
    main()
