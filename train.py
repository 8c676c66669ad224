"""GTR-Turbo training loop: rollout -> guidance -> PPO step -> merge, on CPU or GPUs.

Implements GTR-Turbo (docs/ALGORITHM.md §4) on top of the RL4VLM PPO baseline (§2-3). Each
update of the loop in `main`:
  1. rollout   N environments in lockstep, one batched generate per step (rollout.py)
  2. guide     kl:  the merged teacher scores the agent's thoughts; A' = A - beta*KL (§4.3)
               sft: the teacher answers; its thoughts are imitated, L += c*L_SFT   (§4.2)
               (teacher.py; skipped by --guidance none, the RL4VLM baseline)
  3. PPO       GAE, clipped surrogate on the lambda-weighted sequence log-prob (ppo.py)
  4. merge     every --merge-every updates the policy adapter is merged into the teacher
               adapter with TIES and EMA/SMA weights (teacher.py, merge.py, §4.1)
Before RL, a tiny model is warm-started by SFT on the environments' expert demonstrations (the
paper starts RL from an SFT checkpoint: a real --model is one, and gets no warm start).

Run (a tiny offline VLM is built on first use; nothing is downloaded):
    python train.py                       # warm start + GTR-Turbo (KL) on NumberLine, ~5 min on CPU
    python train.py --guidance none       # the RL4VLM baseline (PPO only)
    python train.py --guidance sft --env gtr/Points24-v0
    torchrun --nproc_per_node=2 train.py  # one process per CPU core or GPU
    python train.py --model Qwen/Qwen2.5-VL-3B-Instruct --steps-per-update 1024 \
        --max-new-tokens 256 --temperature 0.2 --lr 1e-5 --micro-batch-size 4  # the paper's sizes
Outputs in --out: config.json, metrics.jsonl (one JSON object per update), eval.jsonl, checkpoint/
(plumbing/checkpoint.py), and with --tensorboard or --wandb the same numbers there
(plumbing/report.py).
"""

import collections
import contextlib
import dataclasses
import functools
import os
import sys
import time

import gymnasium as gym
import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import config
from demonstrations import warm_start
from distill import kl_penalized_advantages, sft_loss
from plumbing import checkpoint
from plumbing.distributed import all_mean, setup_distributed, shutdown_distributed
from plumbing.report import RunLog, log_update, run_evaluation
from plumbing.tinyvlm import build_policy
from ppo import (accumulate_gradient, batch_moments, clipped_step, cosine_lr, explained_variance,
                 gae, gradient_norms, micro_batches, normalize_advantages, policy_loss,
                 value_loss, variance_shares)
from rollout import Rollout
from teacher import Teacher, remember, replay_draws, replay_loss


def parse_args(argv=None):
    """train.py's flags (config.py), checked, with this file's docstring heading --help."""
    return config.parse_args(argv, __doc__)


def actor_critic_optimizer(policy, args):
    """Adam over two parameter groups, each with its own learning rate and gradient clip: the
    actor (the policy adapter; the backbone the shared critic reads too) and the critic (the
    value head, and its own adapter with --critic adapter)."""
    critic = policy.critic_parameters()
    actor = [p for p in policy.parameters() if p.requires_grad and all(p is not q for q in critic)]
    return torch.optim.Adam([
        {"params": actor, "lr": args.lr, "base_lr": args.lr, "max_grad_norm": args.max_grad_norm},
        {"params": critic, "lr": args.critic_lr, "base_lr": args.critic_lr,
         "max_grad_norm": args.critic_max_grad_norm}])


def learning_rate(update, args, lr=None, first=1):
    """The learning rate of update `update` (1-based): cosine from `lr` (--lr) at update `first`
    to --lr-min at update --lr-updates + 1 (all of --updates by default), then held (§3: the
    reference steps its scheduler once per update). The actor's schedule starts after
    --critic-warmup (`first`), the critic's at update 1."""
    span = max(1, (args.lr_updates or args.updates) - (first - 1))
    return cosine_lr(update - first, span, lr or args.lr, args.lr_min)


@dataclasses.dataclass
class Run:
    """What one process's run holds between updates (`setup` builds it)."""
    policy: torch.nn.Module        # the ActorCritic (policy.py)
    model: torch.nn.Module         # the same, wrapped by DDP when there are several processes
    optimizer: torch.optim.Optimizer
    runner: Rollout                # the environments, in lockstep
    counters: dict                 # update, env_steps, merges
    teacher: Teacher | None        # None with --guidance none
    metrics: RunLog | None         # rank 0 writes the run's records
    replay: list | None            # --guidance sft --sft-batch replay: every step's target


def setup(args, rank, world, device):
    """Build or resume the run: the policy (--init, or the checkpoint of --resume), its optimizer,
    the environments, the warm start (a tiny model's SFT on demonstrations, evaluated), the teacher
    and the critic adapter. With --eval-only, the policy is evaluated and None returned."""
    checkpoint.check_start(args, world)
    torch.manual_seed(args.seed + rank)
    resume = checkpoint.latest(args.out) if args.resume else None
    try:
        policy = build_policy(args, device, (os.path.join(resume, "adapters", "policy") if resume
                                             else args.init or None))
    except (OSError, ValueError) as error:
        # a --model that cannot be loaded: its message, no traceback
        sys.exit(str(error))
    # DDP broadcasts rank 0's weights to every rank and all-reduces gradients; the rest runs on the
    # bare module.
    model = torch.nn.parallel.DistributedDataParallel(policy) if world > 1 else policy
    optimizer = actor_critic_optimizer(policy, args)
    runner, counters, replay = None, {"update": 0, "env_steps": 0, "merges": 0}, None
    if resume:  # runner stays None when the run had another number of processes
        runner, counters, replay = checkpoint.load(resume, optimizer, rank, world)
    if runner is None:
        # Distinct seeds per rank, offset by the update when resumed on another number of processes.
        runner = Rollout([gym.make(args.env) for _ in range(args.num_envs)],
                         unparsed_action=args.unparsed_action,
                         seed=args.seed + 1000 * rank + 7919 * counters["update"])
    if args.eval_only:
        run_evaluation(policy, args, rank, world, counters["update"])
        return None
    if args.guidance == "sft" and args.sft_batch == "replay" and replay is None:
        replay = []  # ((frame, prompt), SFT target) or (None, None) of every step since update 1
    metrics = RunLog(args, world, counters["update"] if resume else None) if rank == 0 else None
    if args.warmup_sft_steps and not resume:
        trainable = [p for p in policy.parameters() if p.requires_grad]
        row = warm_start(model, policy, trainable, args, rank, world)
        if metrics:
            metrics.write(row)
        if args.eval_episodes:
            run_evaluation(policy, args, rank, world, 0, metrics)  # the level RL has to rise above
    # Attached after the warm start, so the warm start is the same whatever the guidance (a seed's
    # methods share it).
    teacher = Teacher(policy, args) if args.guidance != "none" else None
    if teacher and resume:
        teacher.load(policy, os.path.join(resume, "adapters"), counters)
    elif teacher:
        teacher.start(policy)  # pi_T^(0): the policy RL starts from
    if args.critic == "adapter" and not resume:
        # The critic adapter starts as the policy RL starts from (a critic initialised from the
        # SFT model, as verl's and OpenRLHF's are): its features already read the game.
        policy.load_adapter_state(policy.adapter_state("policy"), "critic")
    run = Run(policy, model, optimizer, runner, counters, teacher, metrics, replay)
    if args.warmup_sft_steps and not resume:
        save(run, args, rank, world)  # update 0: the warm-started policy can seed other runs
    return run


def save(run, args, rank, world):
    """A checkpoint of the run (plumbing/checkpoint.py)."""
    checkpoint.save(args.out, run.policy, run.optimizer, run.runner, run.counters, rank, world,
                    args.keep_checkpoints, run.replay)


def set_learning_rates(optimizer, update, args):
    """This update's learning rates; returns the actor's. --critic-warmup: for its first N
    updates only the critic learns (the actor's rate is 0, and ppo_update drops its gradients);
    the actor's cosine then starts at update N + 1, the critic's at update 1."""
    actor, critic = optimizer.param_groups
    actor["lr"] = (0.0 if update <= args.critic_warmup
                   else learning_rate(update, args, args.lr, first=args.critic_warmup + 1))
    critic["lr"] = learning_rate(update, args, args.critic_lr)
    return actor["lr"]


def main(args, rank, world, device):
    """One run (or --eval-only, one evaluation) as process `rank` of `world` (setup_distributed)."""
    run = setup(args, rank, world, device)
    if run is None:
        return
    policy, teacher, counters = run.policy, run.teacher, run.counters
    recent = collections.deque(maxlen=10)  # (successes, episodes) of the last 10 updates
    for update in tqdm(range(counters["update"] + 1, args.updates + 1), disable=rank != 0,
                       desc="updates", initial=counters["update"], total=args.updates):
        lr = set_learning_rates(run.optimizer, update, args)
        # Rollouts, teacher and PPO passes run in eval mode: LoRA dropout would make the first ratio
        # differ from 1.
        policy.eval()
        start = time.perf_counter()
        # ---- 1. Rollout (rollout.py, docs/ALGORITHM.md §3) ------------------------------------
        batch = run.runner.collect(policy, args.steps_per_update // args.num_envs,
                                   args.temperature, args.max_new_tokens, args.format_reward,
                                   args.format_penalty,
                                   teacher.kl_temperature() if args.guidance == "kl" else None)
        time_rollout = time.perf_counter() - start
        # ---- 2. Guide: the merged teacher's KL penalties or SFT answers (teacher.py, §4.2-4.3) -
        guidance = teacher.guide(policy, batch, run.runner.envs[0].unwrapped) if teacher else None
        if run.replay is not None:  # --sft-batch replay: this rollout's targets join the buffer
            remember(run.replay, policy, batch.observations, guidance.sft_targets)
        # ---- 3. PPO epochs on the rollout (ppo.py, §3) ----------------------------------------
        start = time.perf_counter()
        # --merge-snapshot epoch: ppo_update keeps the policy adapter after each epoch for step 4.
        snapshots = [] if teacher and args.merge_snapshot == "epoch" else None
        logs = ppo_update(run.model, run.optimizer, batch, guidance, args, snapshots,
                          update <= args.critic_warmup, run.replay)
        time_update = time.perf_counter() - start
        # ---- 4. Merge the new policy into the teacher (teacher.py, merge.py, §4.1) ------------
        time_merge = teacher.merge(policy, update, snapshots or ()) if teacher else 0.0

        counters["update"], counters["env_steps"] = (
            update, counters["env_steps"] + args.steps_per_update * world)
        counters["merges"] = teacher.merges if teacher else 0
        timing = {"time_rollout": time_rollout, "time_update": time_update,
                  "time_merge": time_merge, "time_teacher": guidance.seconds if guidance else 0.0,
                  "env_steps_per_s": args.steps_per_update * world / time_rollout, "lr": lr}
        log_update(run.metrics, batch, guidance, logs | timing, counters, recent, world)
        if update % args.save_every == 0 or update == args.updates:
            save(run, args, rank, world)
        if args.eval_every and update % args.eval_every == 0 and update != args.updates:
            run_evaluation(policy, args, rank, world, update, run.metrics)
    if args.eval_episodes and counters["update"] > 0:  # a warm start alone was evaluated above
        run_evaluation(policy, args, rank, world, counters["update"], run.metrics)
    if run.metrics:
        run.metrics.close()


def advantages_and_returns(batch, guidance, args):
    """The policy's advantages and the critic's targets, [T*N] each, plus their diagnostics.

    §3: the format reward b is added to a step's advantage after GAE; §4.3: so is the teacher's KL
    penalty, A' = A - beta * KL_hat. The critic learns the environment's return only: a V(s') that
    carried every future format bonus (up to 3 / (1 - 0.9) = 30) would make ending an episode, by
    winning too, forfeit more than a win pays (docs/RESULTS.md, "Measured choices behind the
    defaults"; --value-target shaped is the reference's way)."""
    env_advantages, returns = gae(batch.rewards, batch.values, batch.next_values, batch.terminated,
                                  batch.truncated, args.gamma, args.gae_lambda)  # [T, N]
    advantages = env_advantages + batch.format_rewards  # [T, N]
    if args.guidance == "kl":
        advantages = kl_penalized_advantages(advantages, guidance.teacher_kl, args.kl_coef)
    if args.value_target == "shaped":
        returns = returns + (advantages - env_advantages)
    # Which signal the policy gradient follows: the environment's reward or the format bonus.
    diagnostics = variance_shares(advantages, adv_var_env=env_advantages,
                                  adv_var_format=batch.format_rewards)
    diagnostics["explained_variance"] = explained_variance(batch.values, returns)
    return normalize_advantages(advantages.flatten()), returns.flatten(), diagnostics


def ppo_update(model, optimizer, batch, guidance, args, snapshots=None, actor_frozen=False,
               replay=None):
    """PPO epochs over mini-batches of one rollout (docs/ALGORITHM.md §3). Returns the logs.
    `optimizer`: actor_critic_optimizer's. `snapshots`: a list that gets a copy of the policy
    adapter after every epoch in which the policy stepped, the last one at an early stop
    (--merge-snapshot epoch, §4.1). `actor_frozen` (--critic-warmup): only the critic steps; the
    actor's gradients are dropped before each step, so Adam neither moves the actor nor feeds
    its moments. `replay` (--sft-batch replay): the ((frame, prompt), SFT target) pairs of
    every step so far, (None, None) where a step has no target; each mini-batch imitates as many
    of them, drawn without replacement and reshuffled when all were drawn (§4.2)."""
    advantages, returns, diagnostics = advantages_and_returns(batch, guidance, args)  # [T*N] each
    old_logprobs = batch.old_logprobs.flatten()  # [T*N]
    old_values = batch.values.flatten()  # [T*N], the value clip's anchor
    targets = guidance.sft_targets if args.guidance == "sft" and replay is None else None
    world = dist.get_world_size() if dist.is_initialized() else 1
    policy = model.module if world > 1 else model  # DDP wraps the policy
    if args.value_norm:  # the running statistics of the critic's targets, over all processes
        policy.value_head.update(*batch_moments(returns))
    clip_groups = [(group["params"], group["max_grad_norm"]) for group in optimizer.param_groups]
    samples = len(old_logprobs)
    logs = collections.defaultdict(list)
    steps, stop = 0, False
    for epoch in range(args.ppo_epochs):
        order = torch.randperm(samples).tolist()  # [T*N], this epoch's shuffle
        if epoch == 0 and next(policy.parameters()).dtype != torch.float32:
            # bfloat16 rounds differently in differently padded batches: the rollout's log-probs
            # and PPO's of the same policy differ by up to 0.02 at T = 0.2 (docs/ALGORITHM.md §6),
            # which the early stop would read as a step. Recomputed in this epoch's own
            # micro-batches, every ratio before the first step is exactly 1.
            old_logprobs = recomputed_logprobs(model, batch, order, targets, args)
        steps_in_epoch = 0
        draws = replay_draws(len(replay)) if replay else None  # this epoch's replay sampler
        for number, minibatch in enumerate(micro_batches(order, args.minibatch_size)):
            # §4.2: the SFT loss is the NLL over the mini-batch's guided tokens, however it is
            # split.
            sft_tokens = (sum(guidance.sft_tokens[i] for i in minibatch) / len(minibatch)
                          if targets else 0.0)
            first = len(logs["approx_kl"])  # this mini-batch's statistics are logs[...][first:]
            # One gradient over the mini-batch, accumulated over micro-batches; DDP all-reduces it
            # in the last micro-batch's backward only. The update's first mini-batch also logs
            # each loss's gradient norm.
            loss_of = functools.partial(
                micro_batch_loss, model, batch, advantages, returns, old_logprobs, old_values,
                targets, sft_tokens, args, logs, diagnose=epoch == number == 0,
                replay=replay, draws=draws, minibatch_size=len(minibatch))
            optimizer.zero_grad(set_to_none=True)
            accumulate_gradient(loss_of, minibatch, args.micro_batch_size, model)
            if epoch == number == 0:  # before any step the ratio is 1 up to rounding (bf16)
                logs["first_log_ratio_max"].append(max(logs["log_ratio_max"]))
            # Early stop (--target-kl): the mini-batch's approx_kl to the rollout policy, before
            # this step, averaged over processes so that they all stop together.
            if args.target_kl and all_mean(logs["approx_kl"][first:], world) > 1.5 * args.target_kl:
                stop = True
                break
            if actor_frozen:
                for param in optimizer.param_groups[0]["params"]:
                    param.grad = None  # Adam skips a parameter without a gradient
            (grad_norm, critic_grad_norm), stepped = clipped_step(optimizer, clip_groups)
            logs["grad_norm"].append(grad_norm)
            logs["grad_norm_critic"].append(critic_grad_norm)
            logs["skipped_steps"].append(not stepped)
            steps_in_epoch += stepped
        steps += steps_in_epoch
        if snapshots is not None and steps_in_epoch:  # §4.1: the policy after this epoch
            snapshots.append(policy.adapter_state("policy"))
        if stop:
            break
    return (diagnostics | {"sft_loss": float("nan")}
            | {k: float(np.mean(v)) for k, v in logs.items()}
            | {"log_ratio_max": max(logs["log_ratio_max"]),
               "skipped_steps": int(sum(logs["skipped_steps"])), "optimizer_steps": steps})


@torch.no_grad()
def recomputed_logprobs(model, batch, order, targets, args):
    """The sequence log-probs of the rollout's answers, [T*N], each scored in the micro-batch of
    the epoch order `order` that PPO will score it in (same padding, same SFT targets beside it)."""
    logprobs = batch.old_logprobs.flatten().clone()  # [T*N]
    for minibatch in micro_batches(order, args.minibatch_size):
        for idx in micro_batches(minibatch, args.micro_batch_size):
            out = model([batch.encoded[i] for i in idx], [batch.responses[i] for i in idx],
                        args.temperature, targets=micro_batch_targets(targets, idx), value=False)
            logprobs[idx] = out["seq_logprob"].float().cpu()
    return logprobs


def micro_batch_targets(targets, idx):
    """The SFT targets of a micro-batch, or None where none of its samples has one."""
    if targets is None or all(targets[i] is None for i in idx):
        return None
    return [targets[i] for i in idx]


def micro_batch_loss(model, batch, advantages, returns, old_logprobs, old_values, targets,
                     sft_tokens, args, logs, idx, diagnose=False, replay=None, draws=None,
                     minibatch_size=None):
    """PPO loss (+ the SFT loss on the teacher's thoughts) of the micro-batch `idx`, in ONE model
    call, and policy_loss's statistics; both are appended to `logs` too. `sft_tokens`: guided
    tokens per sample of the mini-batch (SFT guidance). `diagnose`: also log each loss's gradient
    norm on the policy adapter (the update's first mini-batch, before any step). `replay`,
    `draws`, `minibatch_size` (--sft-batch replay): the SFT pass on as many pairs drawn from the
    replay buffer runs first, with its own backward (replay_loss)."""
    policy = model.module if hasattr(model, "module") else model  # DDP wraps the policy
    if draws is not None:
        drawn = [replay[next(draws)] for _ in idx]
        with model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext():
            replay_loss(policy, drawn, minibatch_size, args, logs)
    # Answers scored at the sampling temperature (§2); SFT guidance: the teacher's answers in the
    # same call, a second continuation of each prompt, at temperature 1 (the reference's). None
    # where no teacher answer parsed here.
    sft_targets = micro_batch_targets(targets, idx)
    out = model([batch.encoded[i] for i in idx], [batch.responses[i] for i in idx],
                args.temperature, targets=sft_targets)
    device = out["value"].device
    pg_loss, stats = policy_loss(out["seq_logprob"], old_logprobs[idx].to(device),
                                 advantages[idx].to(device), args.clip, args.ratio_guard)
    # The critic regresses on its normalised scale (identity without --value-norm); PPO2's value
    # clip (--value-clip) keeps V within a band around its value at rollout time.
    critic_loss = value_loss(policy.value_head.normalize(out["value"]),
                             policy.value_head.normalize(returns[idx].to(device)),
                             policy.value_head.normalize(old_values[idx].to(device)),
                             clip=args.value_clip or None)
    vf_loss = args.vf_coef * critic_loss
    if diagnose:
        # Their gradients on the policy adapter: with --critic shared, if the value loss's is much
        # larger, the critic's regression, not the policy gradient, moves it (0 otherwise).
        actor = list(policy.adapter_parameters("policy").values())
        for name, norm in gradient_norms({"policy_loss": pg_loss, "value_loss": vf_loss},
                                         actor).items():
            logs[f"grad_norm_{name}"].append(norm)
    loss = pg_loss + vf_loss
    for key, value in (stats | {"policy_loss": pg_loss, "value_loss": critic_loss}).items():
        logs[key].append(value.item())
    # the teacher's thought tokens are imitated, or its whole answer (--guide-tokens all)
    if sft_targets is not None:
        guided = out["target_mask"] if args.guide_tokens == "all" else out["target_thought_mask"]
        # ppo_update weights this micro-batch's loss by its share of the mini-batch's samples;
        # dividing the NLL by sft_tokens x its samples makes the accumulated SFT term the NLL
        # summed over the mini-batch's guided tokens, divided by their number.
        guidance_loss = sft_loss(out["target_logprobs"], guided, tokens=sft_tokens * len(idx))
        loss = loss + args.sft_coef * guidance_loss
        logs["sft_loss"].append(sft_loss(out["target_logprobs"], guided).item())
    return loss


def run(argv=None):
    """The command line: the process group (torchrun's, else a world of one) lives around `main`."""
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.device)
    try:
        main(args, rank, world, device)
    finally:  # also after an exit inside main; main's frame, DDP wrapper included, is gone now
        shutdown_distributed(world)


if __name__ == "__main__":
    run()
