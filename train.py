"""GTR-Turbo training loop: rollout -> PPO step -> periodic merge -> SFT/KL guidance.

Implements GTR-Turbo (PAPER.md §4) on top of the RL4VLM PPO baseline (PAPER.md §2-3):
  1. rollout   N environments in lockstep, one batched generate per step (rollout.py)
  2. guidance  kl:  the merged teacher scores the agent's thoughts; A' = A - beta*KL (§4.3)
               sft: the teacher answers; its thoughts are imitated, L += c*L_SFT (§4.2)
  3. PPO       GAE, clipped surrogate on the lambda-weighted sequence log-prob (ppo.py)
  4. merge     every --merge-every updates the policy adapter is merged into the teacher
               adapter with TIES and EMA/SMA weights (merge.py, §4.1)

Run (a tiny offline VLM is built on first use; nothing is downloaded):
    python train.py                                   # warm start + GTR-Turbo (KL) on NumberLine, ~6 min on CPU
    python train.py --guidance none                   # the RL4VLM baseline (PPO only)
    python train.py --guidance sft --env gtr/Points24-v0
    torchrun --nproc_per_node=2 train.py              # one process per CPU core or GPU
    python train.py --model Qwen/Qwen2.5-VL-3B-Instruct --steps-per-update 1024 --max-new-tokens 256 \
        --temperature 0.2 --lr 1e-5 --micro-batch-size 4     # the paper's sizes
Outputs in --out: config.json, metrics.jsonl (one JSON object per update), adapters/.
"""

import ast
import collections
import dataclasses
import hashlib
import inspect
import itertools
import json
import os
import pickle
import shutil
import sys
import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import envs  # noqa: F401  (registers the gtr/ environments)
from distill import KL_ESTIMATORS, kl_penalized_advantages, sft_loss
from merge import update_teacher
from policy import LoraArgs, load_policy
from ppo import cosine_lr, gae, normalize_advantages, policy_loss, value_loss
from rollout import Rollout, evaluate, expert_demonstrations


@dataclass
class Args:
    env: str = "gtr/NumberLine-v0"
    """gymnasium id of the environment (gtr/NumberLine-v0, gtr/EZPoints-v0, gtr/Points24-v0, gtr/Blackjack-v0)"""
    model: str = "tiny"
    """hub id or folder of a Qwen2-VL / Qwen2.5-VL checkpoint, or 'tiny' (built offline)"""
    guidance: str = "kl"
    """teacher guidance: none (RL4VLM PPO), sft (PAPER.md §4.2) or kl (§4.3)"""
    num_envs: int = 8
    """environments stepped in lockstep per process (one batched generate per step)"""
    steps_per_update: int = 64
    """environment steps per update per process (paper: 1024)"""
    updates: int = 50
    """number of PPO updates"""
    seed: int = 0
    """random seed (process r uses seed + 1000 r for its environments)"""
    out: str = "runs/default"
    """run folder for config.json, metrics.jsonl and adapters"""
    device: str = "auto"
    """auto, cpu, cuda"""
    image_size: int = 0
    """resize observations to this many pixels before the processor (0: the model's default)"""
    # Sampling and the action log-prob (PAPER.md §2)
    temperature: float = 1.0
    """sampling temperature; logits are divided by it when evaluating too (paper: 0.2)"""
    max_new_tokens: int = 64
    """longest answer in tokens (paper: 256)"""
    thought_coef: float = 0.5
    """lambda: weight of the thought tokens in the action log-prob (0.5 card games, 0.2 ALFWorld)"""
    format_reward: float = 3.0
    """reward for an answer that parses, added after GAE (0 here and in --format-penalty: off)"""
    format_penalty: float = -2.0
    """reward for an answer that does not parse"""
    unparsed_action: str = "random"
    """what an unparsed answer plays: random (the reference) or penalty (the env's illegal-move penalty)"""
    # PPO (PAPER.md §3)
    gamma: float = 0.9
    """discount"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    clip: float = 0.1
    """PPO clip range"""
    ratio_guard: float = 10.0
    """if any ratio in a micro-batch exceeds this, only the clipped term is used"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.01
    """gradient norm clip"""
    ppo_epochs: int = 4
    """PPO epochs per update"""
    minibatch_size: int = 32
    """samples per optimizer step (paper: 128 by gradient accumulation)"""
    micro_batch_size: int = 32
    """samples per forward pass; gradients are accumulated over a mini-batch (GPU, 3B model: 4)"""
    lr: float = 1e-4
    """Adam learning rate, cosine-annealed to lr_min"""
    lr_min: float = 1e-9
    """final learning rate"""
    lr_updates: int = 0
    """updates over which the learning rate anneals (0: all of --updates; paper: 25)"""
    lora_r: int = 128
    """LoRA rank"""
    lora_alpha: int = 256
    """LoRA alpha"""
    lora_dropout: float = 0.05
    """LoRA dropout"""
    lora_vision: bool = True
    """also put LoRA on the vision tower"""
    lora_targets: str = ""
    """comma-separated module names (or suffixes) to adapt instead of every linear layer"""
    # GTR-Turbo teacher (PAPER.md §4)
    kl_coef: float = 1.0
    """beta: weight of the teacher KL subtracted from the advantages"""
    kl_estimator: str = "clip"
    """per-token KL estimator: clip (paper), abs, k3, forward"""
    sft_coef: float = 1.0
    """weight of the SFT loss on the teacher's thoughts"""
    merge: str = "ties"
    """merge operator: ties, linear, dare"""
    merge_weights: str = "ema"
    """teacher update weights: ema (alpha, 1-alpha) or sma (1/k, (k-1)/k)"""
    ema_alpha: float = 0.5
    """EMA weight of the newest checkpoint"""
    ties_density: float = 0.8
    """fraction of entries TIES (and DARE) keep"""
    merge_space: str = "factors"
    """merge LoRA A and B factors (the reference) or their product B@A (delta)"""
    merge_every: int = 1
    """merge the policy into the teacher every this many updates"""
    teacher: str = ""
    """a fixed teacher adapter folder instead of the merged one (GTR with a local teacher; static ablation)"""
    init: str = ""
    """start from this saved policy adapter folder, e.g. a warm start's OUT/checkpoint/adapters/policy
    (add --warmup-sft-steps 0 to start RL from it directly)"""
    # SFT warm start on the environments' expert demonstrations (the paper starts RL from SFT)
    warmup_sft_steps: int = 200
    """optimizer steps of SFT on expert demonstrations before RL (0: none)"""
    warmup_lr: float = 1e-3
    """learning rate of the warm start"""
    warmup_batch_size: int = 32
    """demonstrations per warm-start step"""
    # Checkpoints and evaluation
    save_every: int = 5
    """write OUT/checkpoint every this many updates (and after the last)"""
    resume: bool = False
    """continue from OUT/checkpoint"""
    eval_episodes: int = 128
    """episodes of the final evaluation on fresh seeds (0: none)"""
    eval_every: int = 0
    """also evaluate every this many updates (0: only at the end)"""
    eval_temperature: float = -1.0
    """sampling temperature of evaluation (-1: the sampling --temperature; 0: greedy)"""
    eval_only: bool = False
    """evaluate the run in --out (with --resume) and exit"""


def parse_dataclass(cls, argv=None, description=__doc__):
    """Command-line flags from a dataclass's fields; each field's docstring is its --help text."""
    import argparse
    body = ast.parse(inspect.getsource(cls)).body[0].body
    helps = {node.target.id: body[i + 1].value.value for i, node in enumerate(body[:-1])
             if isinstance(node, ast.AnnAssign) and isinstance(body[i + 1], ast.Expr)}
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        flag, text = "--" + f.name.replace("_", "-"), f"{helps[f.name]} (default: {f.default})"
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        else:
            parser.add_argument(flag, type=f.type, default=f.default, help=text)
    return cls(**vars(parser.parse_args(argv)))


def parse_args(argv=None):
    args = parse_dataclass(Args, argv)
    check_args(args)
    return args


def check_args(args):
    """Stop early, with the fix in the message, on flags that would fail deep inside a library."""
    choices = {"guidance": ("none", "sft", "kl"), "merge": ("ties", "linear", "dare"),
               "merge_weights": ("ema", "sma"), "merge_space": ("factors", "delta"),
               "kl_estimator": KL_ESTIMATORS, "unparsed_action": ("random", "penalty")}
    for name, valid in choices.items():
        if getattr(args, name) not in valid:
            sys.exit(f"--{name.replace('_', '-')} {getattr(args, name)!r}: choose one of {', '.join(valid)}")
    if args.env not in gym.registry:
        sys.exit(f"--env {args.env!r} is not a registered gymnasium id; bundled: {', '.join(envs.ENV_IDS)}")
    if args.steps_per_update % args.num_envs:
        sys.exit(f"--steps-per-update {args.steps_per_update} must be a multiple of --num-envs {args.num_envs}")
    for flag in ("teacher", "init"):
        folder = getattr(args, flag)
        if folder and not os.path.exists(os.path.join(folder, "adapter_config.json")):
            sys.exit(f"--{flag} {folder!r}: no adapter_config.json there; pass a peft adapter folder")
    if args.init:
        with open(os.path.join(args.init, "adapter_config.json")) as f:
            rank = json.load(f).get("r")
        if rank != args.lora_r:
            sys.exit(f"--init {args.init!r} holds a rank-{rank} adapter: pass --lora-r {rank} (and its --lora-alpha)")
    if args.eval_only and not args.resume:
        sys.exit("--eval-only evaluates a saved run: add --resume (and --out RUN)")
    if args.resume:
        checkpoint = checkpoint_dir(args.out)
        if checkpoint is None:
            sys.exit(f"--resume: no checkpoint in {args.out}/checkpoint; train without --resume first")
        with open(os.path.join(args.out, "config.json")) as f:
            saved = json.load(f)
        # These fix what the checkpoint holds; continuing with others would silently mix runs.
        fixed = ("model", "env", "guidance", "num_envs", "steps_per_update", "lora_r", "lora_vision", "lora_targets")
        changed = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {getattr(args, k)!r}" for k in fixed
                   if saved.get(k) != getattr(args, k)]
        if changed:
            sys.exit(f"--resume: the run in {args.out} was trained with other settings ({'; '.join(changed)}). "
                     "Resume with the same flags, or start a new run with another --out.")


def setup_distributed(device):
    """torchrun sets RANK/WORLD_SIZE; plain `python train.py` is a world of one."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                  ("cpu" if device == "auto" else device))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        return rank, world, torch.device("cuda", torch.cuda.current_device())
    return rank, world, torch.device("cpu")


def all_mean(values, world):
    """Mean of a list of floats over all processes (episode statistics, losses)."""
    t = torch.tensor([sum(values), len(values)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(t)
    return (t[0] / t[1]).item() if t[1] > 0 else float("nan")


def main(args):
    rank, world, device = setup_distributed(args.device)
    torch.manual_seed(args.seed + rank)
    checkpoint = checkpoint_dir(args.out) if args.resume else None
    lora = LoraArgs(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, vision=args.lora_vision,
                    target_modules=args.lora_targets)
    policy = load_policy(args.model, lora, device=device, thought_coef=args.thought_coef,
                         image_size=args.image_size or None, seed=args.seed,
                         adapter_path=os.path.join(checkpoint, "adapters", "policy") if checkpoint else args.init or None)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    # DDP broadcasts rank 0's weights (LoRA init, value head) to every rank at construction and
    # all-reduces gradients in backward; everything else below runs on the bare module.
    model = torch.nn.parallel.DistributedDataParallel(policy) if world > 1 else policy
    optimizer = torch.optim.Adam(trainable, lr=args.lr)
    env_list = [gym.make(args.env) for _ in range(args.num_envs)]
    # Each rank plays its own environments with distinct seeds.
    runner = Rollout(env_list, seed=args.seed + 1000 * rank, unparsed_action=args.unparsed_action)
    state = {"update": 0, "env_steps": 0, "merges": 0, "teacher": None}
    if checkpoint:
        attach_teacher(policy, args)
        runner, state = load_checkpoint(checkpoint, policy, optimizer, rank, world, args)

    if args.eval_only:
        run_evaluation(policy, args, rank, world, state["update"])
        return
    steps = args.steps_per_update // args.num_envs
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(args) | {"world_size": world}, f, indent=2)
        metrics_file = open_metrics(args.out, state["update"] if checkpoint else None)
    fresh_warm_start = bool(args.warmup_sft_steps) and not checkpoint
    if fresh_warm_start:
        # Before the teacher exists, so the warm start (its dropout) is the same whatever the
        # guidance: the methods of one seed start RL from the same policy.
        row = warm_start(model, policy, trainable, args, rank, world)
        if rank == 0:
            metrics_file.write(json.dumps(row) + "\n")
        if args.eval_episodes:
            run_evaluation(policy, args, rank, world, 0)  # the level RL has to rise above
    if not checkpoint:
        attach_teacher(policy, args)
        if args.guidance != "none" and not args.teacher:
            # pi_T^(0): the teacher starts as the starting (SFT warm-started) policy.
            state["teacher"] = policy.adapter_state("policy")
            policy.load_adapter_state(state["teacher"], "teacher")
    if fresh_warm_start:
        # A checkpoint at update 0: the warm-started policy can seed other runs (--init), and a
        # run killed early resumes after its warm start.
        save_checkpoint(args.out, policy, optimizer, runner, state, rank, world)
    progress = tqdm(range(state["update"] + 1, args.updates + 1), disable=rank != 0, desc="updates",
                    initial=state["update"], total=args.updates)
    recent = collections.deque(maxlen=10)  # (successes, episodes) of the last 10 updates
    for update in progress:
        lr = cosine_lr(update - 1, args.lr_updates or args.updates, args.lr, args.lr_min)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # ---- 1. Rollout (with the teacher's KL or answers when guided) -------------------------
        policy.eval()
        start = time.perf_counter()
        batch = runner.collect(policy, steps, args.temperature, args.max_new_tokens, args.guidance,
                               (args.format_reward, args.format_penalty), args.kl_estimator)
        time_rollout = time.perf_counter() - start
        state["env_steps"] += args.steps_per_update * world

        # ---- 2-3. Advantages and PPO epochs (with the SFT loss when guided by SFT) ---------------
        # Still in eval mode: LoRA dropout in the PPO passes would make the ratio to the rollout's
        # log-probs differ from 1 before any update (at T = 0.2 every logit is multiplied by 5).
        start = time.perf_counter()
        logs, diagnostics = ppo_update(model, policy, trainable, optimizer, batch, args)
        time_update = time.perf_counter() - start

        # ---- 4. Merge the new policy into the teacher (PAPER.md §4.1) ---------------------------
        time_merge = 0.0
        if args.guidance != "none" and not args.teacher and update % args.merge_every == 0:
            start = time.perf_counter()
            merge_teacher(policy, state, args)
            time_merge = time.perf_counter() - start
        state["update"] = update

        # ---- 5. Log ---------------------------------------------------------------------------
        episodes = batch.episodes
        row = {
            "update": update, "env_steps": state["env_steps"],
            "success_rate": all_mean([e["success"] for e in episodes], world),
            "episode_return": all_mean([e["return"] for e in episodes], world),
            "episode_length": all_mean([e["length"] for e in episodes], world),
            "episodes": int(all_mean([len(episodes)], world) * world),
            "format_valid": all_mean(batch.format_valid.flatten().tolist(), world),
            "entropy": all_mean(batch.entropy.flatten().tolist(), world),
            "thought_tokens": all_mean(batch.thought_tokens.flatten().tolist(), world),
            **{k: all_mean(v, world) for k, v in logs.items()},
            **{k: all_mean([v], world) for k, v in diagnostics.items()},
            "teacher_kl": all_mean(batch.teacher_kl.flatten().tolist(), world),
            "teacher_parse_rate": all_mean([batch.teacher_parse_rate], world),
            "lr": lr, "time_rollout": time_rollout, "time_update": time_update,
            "time_teacher": batch.time_teacher, "time_merge": time_merge,
            "env_steps_per_s": args.steps_per_update * world / time_rollout,
        }
        if row["episodes"]:
            recent.append((row["success_rate"] * row["episodes"], row["episodes"]))
        # One update ends only ~10-25 episodes: the mean over the last 10 updates shows the trend.
        success_recent = sum(s for s, _ in recent) / max(sum(n for _, n in recent), 1)
        if rank == 0:
            # NaN (no episode finished, no SFT target) is written as null: strict JSON.
            metrics_file.write(json.dumps({k: None if v != v else v for k, v in row.items()}) + "\n")
            metrics_file.flush()
            progress.set_postfix(success_last10=f"{success_recent:.2f}", ret=f"{row['episode_return']:.2f}")
            tqdm.write(f"update {update:3d} | steps {state['env_steps']:6d} | success {row['success_rate']:.2f} "
                       f"(last 10 updates {success_recent:.2f}) | "
                       f"return {row['episode_return']:6.2f} | format {row['format_valid']:.2f} | "
                       f"entropy {row['entropy']:.3f} | kl {row['teacher_kl']:.3f} | "
                       f"pg {row['policy_loss']:+.4f} | vf {row['value_loss']:.3f} | "
                       f"kl_old {row['approx_kl']:.3f} clip {row['clip_fraction']:.2f} | "
                       f"ev {row['explained_variance']:+.2f} | |g| pg/vf {row['grad_norm_policy_loss']:.2g}/"
                       f"{row['grad_norm_value_loss']:.2g} | "
                       f"{row['env_steps_per_s']:.1f} steps/s")
        if update % args.save_every == 0 or update == args.updates:
            save_checkpoint(args.out, policy, optimizer, runner, state, rank, world)
        if args.eval_every and update % args.eval_every == 0 and update != args.updates:
            run_evaluation(policy, args, rank, world, update)
    if rank == 0:
        metrics_file.close()
    if args.eval_episodes and not (fresh_warm_start and state["update"] == 0):  # else evaluated above
        run_evaluation(policy, args, rank, world, state["update"])
    if world > 1:
        dist.destroy_process_group()


def attach_teacher(policy, args):
    """The frozen "teacher" adapter of a guided run: a fixed one (--teacher) or an empty one that
    the merge fills (PAPER.md §4.1). Its parameters are frozen, so `trainable` and DDP, built
    before it, are unchanged."""
    if args.guidance == "none":
        return
    policy.add_teacher(args.teacher or None)


def warm_start(model, policy, trainable, args, rank, world):
    """SFT on expert demonstrations (image, prompt, expert thoughts and action) before RL.

    The paper's RL runs all start from a model fine-tuned on expert trajectories. Here the
    environments' `expert()` writes the demonstrations and distill.py's SFT loss (over every
    answer token: the format, the thoughts and the action) trains the policy adapter.
    """
    optimizer = torch.optim.Adam(trainable, lr=args.warmup_lr)
    rng = np.random.default_rng(args.seed + 7919 * (rank + 1))
    env_list = [gym.make(args.env) for _ in range(args.num_envs)]
    held_out = list(itertools.islice(
        expert_demonstrations([gym.make(args.env) for _ in range(4)], np.random.default_rng(10**6)), 32))
    demonstrations = expert_demonstrations(env_list, rng)
    loss_before = demonstration_loss(policy, held_out, args.micro_batch_size)
    start = time.perf_counter()
    policy.train()
    for _ in tqdm(range(args.warmup_sft_steps), disable=rank != 0, desc="warm start"):
        demos = list(itertools.islice(demonstrations, args.warmup_batch_size))
        optimizer.zero_grad(set_to_none=True)
        for mc_start in range(0, len(demos), args.micro_batch_size):
            micro = demos[mc_start:mc_start + args.micro_batch_size]
            images, prompts, answers = zip(*micro)
            out = model(policy.encode(images, prompts), [policy.answer_ids(a) for a in answers], 1.0)
            # The value head gets no SFT signal; its zero-weighted term keeps DDP's gradient
            # all-reduce expecting the same parameters in every backward.
            loss = sft_loss(out["logprobs"], out["response_mask"]) + 0.0 * out["value"].sum()
            (loss * len(micro) / len(demos)).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
    loss_after = demonstration_loss(policy, held_out, args.micro_batch_size)
    if rank == 0:
        tqdm.write(f"warm start: held-out SFT loss {loss_before:.3f} -> {loss_after:.3f} "
                   f"after {args.warmup_sft_steps} steps")
    return {"update": 0, "phase": "warm_start", "warmup_steps": args.warmup_sft_steps,
            "warmup_loss_before": loss_before, "warmup_loss_after": loss_after,
            "time_warmup": time.perf_counter() - start}


@torch.no_grad()
def demonstration_loss(policy, demos, batch_size):
    """Mean SFT loss (per answer token) of the policy on demonstrations."""
    policy.eval()
    losses = []
    for i in range(0, len(demos), batch_size):
        images, prompts, answers = zip(*demos[i:i + batch_size])
        out = policy(policy.encode(images, prompts), [policy.answer_ids(a) for a in answers], 1.0)
        losses.append(sft_loss(out["logprobs"], out["response_mask"]).item())
    return float(np.mean(losses))


# ---------------------------------------------------------------------------------------------
# Checkpoints, resume and evaluation
# ---------------------------------------------------------------------------------------------
def checkpoint_dir(out):
    """OUT/checkpoint, or the previous one if a save was killed between its two renames."""
    for name in ("checkpoint", "checkpoint.old"):
        path = os.path.join(out, name)
        if os.path.exists(os.path.join(path, "trainer.pt")):
            return path
    return None


def save_checkpoint(out, policy, optimizer, runner, state, rank, world):
    """Everything needed to continue exactly, written to a staging folder and then renamed.

    A kill at any moment leaves a complete checkpoint: either the old one (as checkpoint or,
    between the two renames, checkpoint.old) or the new one.
    """
    final, staging = os.path.join(out, "checkpoint"), os.path.join(out, "checkpoint.tmp")
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        adapters = [name for name in ("policy", "teacher") if name in policy.model.peft_config]
        policy.save(os.path.join(staging, "adapters"), adapters=adapters)  # peft's format
        torch.save({"optimizer": optimizer.state_dict(), "update": state["update"],
                    "env_steps": state["env_steps"], "merges": state["merges"]},
                   os.path.join(staging, "trainer.pt"))
    barrier(world)
    # Per rank: its environments (mid-episode), its rollout RNG and its torch RNG (sampling,
    # dropout, mini-batch order).
    rng = {"torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    # A digest of the weights lets anyone check that all ranks hold the same policy and teacher.
    digest = hashlib.sha256()
    for name, tensor in sorted(policy.state_dict().items()):
        if "lora_" in name or name.startswith("value_head"):
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    with open(os.path.join(staging, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump({"runner": runner, "rng": rng, "weights_sha256": digest.hexdigest()}, f)
    barrier(world)
    if rank == 0:
        old = final + ".old"
        if os.path.exists(final):
            # With `final` complete, an `old` still there is what a kill during the last clean-up
            # left (possibly half deleted); rename() cannot replace a non-empty folder.
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    barrier(world)


def load_checkpoint(path, policy, optimizer, rank, world, args):
    """Restore optimizer, teacher, counters, RNG and environments; the policy adapter and value
    head were loaded by load_policy(adapter_path=...)."""
    from peft.utils import load_peft_weights
    saved_world = json.load(open(os.path.join(args.out, "config.json"))).get("world_size", 1)
    if saved_world != world:
        sys.exit(f"--resume: the run used {saved_world} processes, this one has {world}; "
                 "every rank's environments are in the checkpoint, so resume with the same count")
    trainer = torch.load(os.path.join(path, "trainer.pt"), weights_only=False)
    optimizer.load_state_dict(trainer["optimizer"])
    state = {k: trainer[k] for k in ("update", "env_steps", "merges")}
    state["teacher"] = None
    if args.guidance != "none" and not args.teacher:
        state["teacher"] = load_peft_weights(os.path.join(path, "adapters", "teacher"))
        policy.load_adapter_state(state["teacher"], "teacher")
    with open(os.path.join(path, f"rank{rank}.pkl"), "rb") as f:
        saved = pickle.load(f)
    torch.set_rng_state(saved["rng"]["torch"])
    if saved["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["rng"]["cuda"])
    return saved["runner"], state


def open_metrics(out, last_update):
    """metrics.jsonl for appending, cut back to the checkpoint's update (a run killed after
    logging an update but before saving it repeats that update: no gap, no duplicate)."""
    path = os.path.join(out, "metrics.jsonl")
    rows = []
    if last_update is not None and os.path.exists(path):
        rows = [line for line in open(path) if line.strip() and json.loads(line)["update"] <= last_update]
    with open(path, "w") as f:
        f.writelines(rows)
    return open(path, "a")


def run_evaluation(policy, args, rank, world, update):
    """Success rate (with its standard error) and mean return on fresh seeds, over all ranks."""
    policy.eval()
    temperature = args.temperature if args.eval_temperature < 0 else args.eval_temperature
    share = len(range(rank, args.eval_episodes, world))
    env_list = [gym.make(args.env) for _ in range(min(args.num_envs, max(share, 1)))]
    # Seeds far from training's (seed + 1000 * rank + i), so evaluation deals are fresh; sampling
    # draws from its own generator state, so evaluating does not change the training run.
    seed = 10**6 + args.seed + 1000 * rank
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        torch.manual_seed(seed)
        episodes = evaluate(policy, env_list, share, seed=seed, temperature=temperature,
                            max_new_tokens=args.max_new_tokens, unparsed_action=args.unparsed_action) if share else []
    n = int(round(all_mean([len(episodes)], world) * world))
    success = all_mean([e["success"] for e in episodes], world)
    result = {"update": update, "eval_episodes": n, "eval_success_rate": success,
              "eval_success_stderr": (success * (1 - success) / max(n, 1)) ** 0.5,
              "eval_return": all_mean([e["return"] for e in episodes], world),
              "eval_temperature": temperature}
    if rank == 0:
        tqdm.write(f"eval update {update}: success {success:.3f} +- {result['eval_success_stderr']:.3f} "
                   f"over {n} episodes | return {result['eval_return']:.2f}")
        with open(os.path.join(args.out, "eval.jsonl"), "a") as f:
            f.write(json.dumps(result) + "\n")
    return result


def barrier(world):
    if world > 1:
        dist.barrier()


def ppo_update(model, policy, trainable, optimizer, batch, args):
    """GAE, the per-step terms added after it, then PPO epochs over mini-batches."""
    env_advantages, returns = gae(batch.rewards, batch.values, batch.next_values, batch.terminated,
                                  batch.truncated, args.gamma, args.gae_lambda)  # [T, N]
    # The format reward is added to that step's return after GAE, so it moves that step's
    # advantage directly; so is the KL penalty, A' = A - beta * KL_hat (docs/ALGORITHM.md).
    bonus = batch.format_rewards  # [T, N]
    kl_term = (kl_penalized_advantages(torch.zeros_like(bonus), batch.teacher_kl, args.kl_coef)
               if args.guidance == "kl" else torch.zeros_like(bonus))  # [T, N]
    advantages = (env_advantages + bonus + kl_term).flatten()  # [T*N]
    returns = (returns + bonus + kl_term).flatten()  # [T*N]
    diagnostics = advantage_diagnostics(env_advantages, bonus, kl_term, batch.values, returns)
    advantages = normalize_advantages(advantages)
    old_logprobs = batch.old_logprobs.flatten()  # [T*N]

    logs = {"policy_loss": [], "value_loss": [], "approx_kl": [], "clip_fraction": [], "sft_loss": [],
            "guard_fraction": [], "log_ratio_max": [], "grad_norm": []}
    skipped = 0
    size = len(old_logprobs)
    diagnostics |= loss_gradient_norms(policy, batch, list(range(min(size, args.micro_batch_size))),
                                       advantages, returns, old_logprobs, args)
    for epoch in range(args.ppo_epochs):
        order = torch.randperm(size).tolist()
        for mb_start in range(0, size, args.minibatch_size):
            minibatch = order[mb_start:mb_start + args.minibatch_size]
            optimizer.zero_grad(set_to_none=True)
            # Gradients accumulate over micro-batches: one optimizer step per mini-batch.
            for mc_start in range(0, len(minibatch), args.micro_batch_size):
                idx = minibatch[mc_start:mc_start + args.micro_batch_size]
                loss = micro_batch_loss(model, batch, idx, advantages, returns, old_logprobs, args, logs)
                (loss * len(idx) / len(minibatch)).backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
            logs["grad_norm"].append(grad_norm.item())
            if not torch.isfinite(grad_norm):
                # A NaN or inf gradient would poison the adapter, and through the merge the
                # teacher, for good: skip the step and count it.
                skipped += 1
                optimizer.zero_grad(set_to_none=True)
                continue
            optimizer.step()
    logs["log_ratio_max"] = [max(logs["log_ratio_max"], default=float("nan"))]
    return logs, diagnostics | {"skipped_steps": skipped}


def advantage_diagnostics(env_advantages, format_bonus, kl_term, values, returns):
    """What an RL engineer reads before believing an update: the value function's explained
    variance, and which share of the (unnormalised) advantages' variance comes from the
    environment's reward (GAE), from the format bonus and from the teacher's KL penalty."""
    total = (env_advantages + format_bonus + kl_term).flatten().var()
    returns_var = returns.var()
    return {
        "explained_variance": (1.0 - (returns - values.flatten()).var() / returns_var).item()
        if returns_var > 0 else float("nan"),
        "adv_var_env": (env_advantages.var() / total).item() if total > 0 else float("nan"),
        "adv_var_format": (format_bonus.var() / total).item() if total > 0 else float("nan"),
        "adv_var_kl": (kl_term.var() / total).item() if total > 0 else float("nan"),
    }


def loss_gradient_norms(policy, batch, idx, advantages, returns, old_logprobs, args):
    """Gradient norms of the policy loss and of the (vf_coef-weighted) value loss on the LoRA
    weights they share, before any step of this update: if the value's is much larger, the
    critic's regression, not the policy gradient, is what moves the backbone. One extra
    forward and two backward passes on one micro-batch, on this process's bare module."""
    lora = [p for n, p in policy.named_parameters() if p.requires_grad and "lora_" in n]
    out = policy([batch.encoded[i] for i in idx], [batch.responses[i] for i in idx], args.temperature)
    device = out["value"].device
    pg_loss, _ = policy_loss(out["seq_logprob"], old_logprobs[idx].to(device), advantages[idx].to(device),
                             args.clip, args.ratio_guard)
    vf_loss = args.vf_coef * value_loss(out["value"], returns[idx].to(device))
    norms = {}
    for name, loss in (("grad_norm_policy_loss", pg_loss), ("grad_norm_value_loss", vf_loss)):
        grads = torch.autograd.grad(loss, lora, retain_graph=True, allow_unused=True)
        norms[name] = torch.norm(torch.stack([g.norm() for g in grads if g is not None])).item()
    return norms


def merge_teacher(policy, state, args):
    """pi_T^(k) = merge({pi_theta^(k), pi_T^(k-1)}) into the teacher adapter (PAPER.md §4.1)."""
    state["merges"] += 1
    # Deterministic (DARE is seeded by the merge count), so every rank gets the same teacher.
    state["teacher"] = update_teacher(state["teacher"], policy.adapter_state("policy"), state["merges"],
                                      scheme=args.merge_weights, alpha=args.ema_alpha,
                                      method=args.merge, density=args.ties_density,
                                      seed=args.seed + state["merges"], space=args.merge_space)
    policy.load_adapter_state(state["teacher"], "teacher")


def micro_batch_loss(model, batch, idx, advantages, returns, old_logprobs, args, logs):
    """PPO loss (+ SFT loss on the teacher's thoughts) of one micro-batch, in ONE call to the model."""
    encoded = [batch.encoded[i] for i in idx]
    responses = [batch.responses[i] for i in idx]
    # The agent's answers are scored at the sampling temperature (PAPER.md §2). SFT guidance: the
    # teacher's answers are scored in the same call, as a second continuation of each prompt
    # (the prompt runs once), at temperature 1 as a standard SFT loss does (the reference's).
    targets = [batch.sft_targets[i] for i in idx] if args.guidance == "sft" else []
    targets = targets if any(t is not None for t in targets) else None  # None: no teacher answer parsed
    out = model(encoded, responses, args.temperature, targets=targets)
    pg_loss, stats = policy_loss(out["seq_logprob"], old_logprobs[idx].to(out["value"].device),
                                 advantages[idx].to(out["value"].device), args.clip, args.ratio_guard)
    vf_loss = value_loss(out["value"], returns[idx].to(out["value"].device))
    loss = pg_loss + args.vf_coef * vf_loss
    logs["policy_loss"].append(pg_loss.item())
    logs["value_loss"].append(vf_loss.item())
    logs["approx_kl"].append(stats["approx_kl"].item())
    logs["clip_fraction"].append(stats["clip_fraction"].item())
    logs["guard_fraction"].append(stats["guard_fraction"].item())
    logs["log_ratio_max"].append(stats["log_ratio_max"].item())
    if targets is not None:
        guidance_loss = sft_loss(out["target_logprobs"], out["target_thought_mask"])
        loss = loss + args.sft_coef * guidance_loss
        logs["sft_loss"].append(guidance_loss.item())
    return loss


if __name__ == "__main__":
    main(parse_args())
