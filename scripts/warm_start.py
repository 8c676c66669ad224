"""How long a household warm start must be: held-out loss, admissible commands and reading the
picture, per SFT step.

The warm start (demonstrations.py) trains the policy adapter on the expert's demonstrations. On
the household the answer must copy one command out of the prompt's list, and an inadmissible
command costs -1 and changes nothing, so the share of admissible commands is what RL starts
from. This runs the warm start's own loop (same demonstrations, optimizer and held-out set as
train.py's) and, at step 0 and every --every steps, prints:
  loss          the held-out SFT loss per answer token;
  admissible    the share of admissible commands the policy samples (T = 0.5) on 96 held-out
                states, from the expert playing fresh deals with a random command (of all 130)
                20 % of the time, so that they include the states after a mistake;
  picture       on 64 held-out states where the expert goes to the receptacle that holds what
                it needs, seen only in the picture ("I see a mug on the table, so I go there"),
                the share where the policy goes there too: about 1/7 for a policy that cannot
                read where the objects are, since the prompt's text does not say.

    python scripts/warm_start.py                            # tiny household model, 800 steps
    python scripts/warm_start.py --steps 400 --lr 3e-3      # another warm-start learning rate
    python scripts/warm_start.py --image-size 168           # larger pictures (36 image tokens)
    python scripts/warm_start.py --steps 0 --seed 1 \
        --init runs/household/Household-v0/warm/seed1/checkpoint/adapters/policy
                                                            # the readings of a saved warm start
"""
import argparse
import copy
import functools
import itertools
import os
import sys
import time

import gymnasium as gym
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from demonstrations import (  # noqa: E402
    demonstration_loss,
    demonstration_sft_loss,
    held_out_demonstrations,
    training_demonstrations,
)
from ppo import accumulated_step  # noqa: E402
from train import build_policy, parse_args  # noqa: E402

EXPLORE = 0.2  # the share of random commands in the held-out play, as in demonstrations.py
PICTURE_STATES = 64  # held-out states where only the picture says where to go


def held_out_states(env_id, count, seed=99, picture_only=False):
    """(environment copy, observation) pairs from the expert's play of fresh deals (seeds 5000 on,
    never a training deal's), every third step, a random command of all 130 a fifth of the time.
    picture_only: instead, every state where the expert goes to an object it sees in the picture
    (household.HouseholdEnv._plan's "I see a ..." move)."""
    rng = np.random.default_rng(seed)
    env = gym.make(env_id).unwrapped
    states = []
    for deal in itertools.count(5000):
        obs, _ = env.reset(seed=deal)
        for step in range(env.max_steps):
            thoughts, action = env.expert()
            keep = thoughts.startswith("I see a") if picture_only else step % 3 == 0
            if keep:
                states.append((copy.deepcopy(env), obs))
                if len(states) == count:
                    return states
            if rng.random() < EXPLORE:
                action = int(rng.integers(len(env.actions)))
            obs, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                break


@torch.no_grad()
def sampled_actions(policy, states, temperature=0.5, batch=16):
    """The action each state's sampled answer names (None: it names none), at a fixed seed."""
    policy.eval()
    actions = []
    with torch.random.fork_rng():
        torch.manual_seed(1)
        for i in range(0, len(states), batch):
            chunk = states[i:i + batch]
            encoded = policy.encode([obs for _, obs in chunk], [env.prompt() for env, _ in chunk])
            _, texts = policy.generate(encoded, temperature, 64)
            for (env, _), text in zip(chunk, texts):
                actions.append(env.parse(text))
    return actions


def admissible_share(policy, states):
    """Share of the states on which the policy's sampled answer names an admissible command."""
    admissible = 0
    for (env, _), action in zip(states, sampled_actions(policy, states)):
        admissible += action is not None and env.actions[action] in env.admissible()
    return admissible / len(states)


def expert_share(policy, states):
    """Share of the states on which the policy's sampled answer names the expert's command."""
    agree = 0
    for (env, _), action in zip(states, sampled_actions(policy, states)):
        agree += action == env.expert()[1]
    return agree / len(states)


def main():
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("--env", default="gtr/Household-v0", help="an environment with admissible()")
    cli.add_argument("--steps", type=int, default=800, help="SFT steps")
    cli.add_argument("--every", type=int, default=100, help="steps between readings")
    cli.add_argument("--lr", type=float, default=1e-3, help="the warm start's learning rate")
    cli.add_argument("--model", default="tiny", help="train.py's --model")
    cli.add_argument("--states", type=int, default=96, help="held-out states judged")
    cli.add_argument("--init", default="", help="train.py's --init: start from a saved adapter")
    cli.add_argument("--seed", type=int, default=0, help="train.py's --seed (the tiny model's too)")
    cli.add_argument("--no-lora-vision", action="store_true",
                     help="train.py's --no-lora-vision: the vision tower as --model has it")
    cli.add_argument("--image-size", type=int, default=0,
                     help="train.py's --image-size (a tiny model is built for it; 0: 112)")
    options = cli.parse_args()
    if not hasattr(gym.make(options.env).unwrapped, "admissible"):
        sys.exit(f"--env {options.env}: its environment lists no admissible commands; "
                 "use gtr/Household-v0")
    args = parse_args(["--env", options.env, "--model", options.model, "--warmup-sft-steps",
                       str(options.steps), "--warmup-lr", str(options.lr),
                       "--micro-batch-size", "8", "--init", options.init,
                       "--seed", str(options.seed), "--image-size", str(options.image_size),
                       "--no-lora-vision" if options.no_lora_vision else "--lora-vision"])
    torch.manual_seed(args.seed)
    policy = build_policy(args, torch.device("cpu"), args.init or None)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=args.warmup_lr)
    held_out = held_out_demonstrations(args.env)
    demonstrations = training_demonstrations(args, rank=0)
    states = held_out_states(args.env, options.states)
    pictures = held_out_states(args.env, PICTURE_STATES, picture_only=True)
    loss_of = functools.partial(demonstration_sft_loss, policy, policy)

    start = time.perf_counter()

    def print_reading(step):
        loss = demonstration_loss(policy, held_out, args.micro_batch_size)
        print(f"| {step} | {loss:.3f} | {admissible_share(policy, states):.3f} | "
              f"{expert_share(policy, pictures):.3f} | {time.perf_counter() - start:.0f} |",
              flush=True)

    print(f"{args.env}, --model {args.model}, warm-start lr {args.warmup_lr}, batch "
          f"{args.warmup_batch_size}, seed {args.seed}; {options.states} held-out states, "
          f"{PICTURE_STATES} picture states, T = 0.5\n")
    print("| SFT steps | held-out loss per answer token | admissible commands | "
          "goes where the picture shows | seconds |")
    print("|---|---|---|---|---|")
    print_reading(0)  # the model before any SFT step (or the --init adapter as saved)
    for step in range(1, args.warmup_sft_steps + 1):
        policy.train()
        demos = list(itertools.islice(demonstrations, args.warmup_batch_size))
        accumulated_step(loss_of, demos, args.micro_batch_size, optimizer, [(trainable, 1.0)],
                         model=policy)
        if step % options.every == 0 or step == args.warmup_sft_steps:
            print_reading(step)


if __name__ == "__main__":
    main()
