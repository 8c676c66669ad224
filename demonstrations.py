"""The SFT starting point: expert demonstrations and the warm start trained on them.

GTR-Turbo and RL4VLM start every RL run from a model fine-tuned on expert trajectories
(docs/ALGORITHM.md §2). Here the bundled environments write their own demonstrations: each
has an `expert()` that gives the thoughts and action of a good move, and
`expert_demonstrations` turns it into an endless stream of (image, prompt, answer). The warm
start minimises distill.py's SFT loss over every answer token (format, thoughts and action)
with the policy adapter, before RL and before the teacher exists.

Use (train.py does this when --warmup-sft-steps > 0):
    row = warm_start(model, policy, trainable, args, rank, world)    # the metrics row of update 0
"""

import functools
import itertools
import time

import gymnasium as gym
import numpy as np
import torch
from tqdm import tqdm

import envs as gtr_envs
from distill import sft_loss
from plumbing.distributed import all_mean
from ppo import accumulated_step


TARGET_CHECK_EVERY = 50  # warm-start steps between readings of the held-out loss


def random_move(game, rng):
    """The demonstrations' random action. Where the environment lists the commands admissible now
    (the household), one of them: the mistakes of an agent that copies its command from the list,
    such as going to a receptacle that does not hold what it needs, after which the expert shows
    where to go instead. Elsewhere any action (on the household nearly all of those are
    inadmissible and change nothing)."""
    if hasattr(game, "admissible"):
        commands = game.admissible()
        return game.actions.index(commands[int(rng.integers(len(commands)))])
    return int(rng.integers(len(game.actions)))


def expert_demonstrations(envs, rng, explore=0.2):
    """An endless stream of (observation, prompt, expert answer) from the environments' `expert()`.

    The environments follow the expert, with a random action `explore` of the time so that the
    demonstrations also cover states an imperfect agent reaches (the expert then shows how to
    recover). Episodes continue from one batch to the next, so late states (a long Points24
    formula) are shown as often as early ones. Used for the SFT warm start: the paper starts RL
    from an SFT checkpoint. Take a batch with `itertools.islice(stream, n)`.
    """
    observations = [env.reset(seed=int(rng.integers(2**31)))[0] for env in envs]
    while True:
        for i, env in enumerate(envs):
            game = env.unwrapped
            thoughts, action = game.expert()
            yield (observations[i], game.prompt(),
                   gtr_envs.format_answer(thoughts, game.actions[action]))
            if rng.random() < explore:
                action = random_move(game, rng)
            observations[i], _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                observations[i], _ = env.reset(seed=int(rng.integers(2**31)))


def held_out_demonstrations(env_id):
    """The 32 demonstrations the warm start reports its loss on: a fixed stream that no seed's
    training stream draws."""
    return list(itertools.islice(expert_demonstrations([gym.make(env_id) for _ in range(4)],
                                                       np.random.default_rng(10**6)), 32))


def training_demonstrations(args, rank):
    """Process `rank`'s endless stream of warm-start demonstrations (Args: env, seed, num_envs)."""
    return expert_demonstrations([gym.make(args.env) for _ in range(args.num_envs)],
                                 np.random.default_rng(args.seed + 7919 * (rank + 1)))


def demonstration_sft_loss(model, policy, demos):
    """distill.py's SFT loss over every answer token of `demos`, (image, prompt, answer) triples;
    `model` is the policy or its DDP wrapper."""
    images, prompts, answers = zip(*demos)
    out = model(policy.encode(images, prompts), [policy.answer_ids(a) for a in answers], 1.0,
                value=False)
    # The critic gets no SFT signal and runs no pass; its weights' zero-weighted term keeps DDP's
    # gradient all-reduce expecting the same parameters in every backward.
    untouched = sum(p.sum() for p in policy.critic_parameters())
    return sft_loss(out["logprobs"], out["response_mask"]) + 0.0 * untouched


def warm_start(model, policy, trainable, args, rank, world):
    """SFT of the policy adapter on expert demonstrations; returns a metrics row with the loss
    on 32 held-out demonstrations before and after. Reads these fields of train.py's Args: env,
    seed, num_envs, warmup_sft_steps, warmup_target_loss, warmup_lr, warmup_batch_size,
    micro_batch_size."""
    optimizer = torch.optim.Adam(trainable, lr=args.warmup_lr)
    held_out = held_out_demonstrations(args.env)
    demonstrations = training_demonstrations(args, rank)
    loss_before = demonstration_loss(policy, held_out, args.micro_batch_size)
    start = time.perf_counter()
    loss_of = functools.partial(demonstration_sft_loss, model, policy)
    steps = 0
    for steps in tqdm(range(1, args.warmup_sft_steps + 1), disable=rank != 0, desc="warm start"):
        policy.train()
        demos = list(itertools.islice(demonstrations, args.warmup_batch_size))
        accumulated_step(loss_of, demos, args.micro_batch_size, optimizer, [(trainable, 1.0)],
                         model=model)
        # --warmup-target-loss: stop once the held-out loss says the picture is read (the same
        # decision on every process: the loss is averaged over them).
        if args.warmup_target_loss and steps % TARGET_CHECK_EVERY == 0:
            loss = all_mean([demonstration_loss(policy, held_out, args.micro_batch_size)], world)
            if loss <= args.warmup_target_loss:
                break
    loss_after = demonstration_loss(policy, held_out, args.micro_batch_size)
    if rank == 0:
        tqdm.write(f"warm start: held-out SFT loss {loss_before:.3f} -> {loss_after:.3f} "
                   f"after {steps} steps")
    return {"update": 0, "phase": "warm_start", "warmup_steps": steps,
            "warmup_loss_before": loss_before, "warmup_loss_after": loss_after,
            "time_warmup": time.perf_counter() - start}


@torch.no_grad()
def demonstration_loss(policy, demos, batch_size):
    """Mean SFT loss (per answer token) of the policy on demonstrations."""
    policy.eval()
    losses = []
    for i in range(0, len(demos), batch_size):
        images, prompts, answers = zip(*demos[i:i + batch_size])
        out = policy(policy.encode(images, prompts), [policy.answer_ids(a) for a in answers], 1.0,
                     value=False)
        losses.append(sft_loss(out["logprobs"], out["response_mask"]).item())
    return float(np.mean(losses))
