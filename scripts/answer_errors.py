"""What a policy's answers get wrong: reading the picture, or choosing the move.

On held-out states of a game (the expert playing fresh deals, a random action a fifth of the
time, so that states after a mistake are there too), the policy answers once each at the
sampling temperature, and each answer is put in one class:
  unparsed   no "thoughts" string or no admissible action (the format's failure);
  misread    the thoughts do not name every fact of the state (docs/ALGORITHM.md §4.5: the
             numbers or cards the picture shows), so the picture was misread;
  wrong_move the thoughts name the state's facts and the action is not the expert's (on the
             card games another move can be as good: read it beside the success rate);
  expert     the facts named and the expert's action.
It prints one JSON line of the shares.

    python -m scripts.answer_errors --env gtr/NumberLine-v0 --seed 0 \
        --init runs/warm/checkpoint/adapters/policy   # a saved warm start (train.py --updates 0)
"""
import copy
import itertools
import json

import gymnasium as gym
import numpy as np
import torch

import envs
from plumbing.tinyvlm import build_policy
from train import parse_args

EXPLORE = 0.2  # the share of random actions in the held-out play, as in demonstrations.py


def held_out_states(env_id, count, seed=99):
    """(environment copy, observation) pairs from the expert's play of deals 5000 on (never a
    training deal), a random action EXPLORE of the time."""
    rng = np.random.default_rng(seed)
    env = gym.make(env_id).unwrapped
    states = []
    for deal in itertools.count(5000):
        obs, _ = env.reset(seed=deal)
        for _ in range(100):
            states.append((copy.deepcopy(env), obs))
            if len(states) == count:
                return states
            action = env.expert()[1]
            if rng.random() < EXPLORE:
                action = int(rng.integers(len(env.actions)))
            obs, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                break


@torch.no_grad()
def answer_classes(policy, states, temperature, batch=16):
    """Each state's sampled answer's class (see the module docstring), at a fixed seed."""
    policy.eval()
    classes = []
    with torch.random.fork_rng():
        torch.manual_seed(1)
        for i in range(0, len(states), batch):
            chunk = states[i:i + batch]
            encoded = policy.encode([obs for _, obs in chunk], [env.prompt() for env, _ in chunk])
            _, texts = policy.generate(encoded, temperature, 64)
            for (env, _), text in zip(chunk, texts):
                thoughts, action = envs.extract_thoughts(text), env.parse(text)
                if thoughts is None or action is None:
                    classes.append("unparsed")
                elif envs.thought_grounding(thoughts, env.facts()) < 1.0:
                    classes.append("misread")
                elif action != env.expert()[1]:
                    classes.append("wrong_move")
                else:
                    classes.append("expert")
    return classes


def main():
    args = parse_args()
    policy = build_policy(args, "cpu", args.init or None)
    classes = answer_classes(policy, held_out_states(args.env, 256), args.temperature)
    shares = {name: classes.count(name) / len(classes)
              for name in ("unparsed", "misread", "wrong_move", "expert")}
    print(json.dumps({"env": args.env, "seed": args.seed, "init": args.init,
                      "states": len(classes)} | shares))


if __name__ == "__main__":
    main()
