"""The configuration of a run: train.py's flags, one dataclass field each, and their checks.

CleanRL-style: each field is a flag, its docstring the --help text (plumbing/flags.py), a
`Literal` field's values its choices. `parse_args` checks every value before anything runs and
stops with one line naming the flag, its value and what is valid; the defaults per environment
(envs.ENV_DEFAULTS) and the automatic warm start (`resolve_warmup`) are applied there too.

    args = parse_args(["--guidance", "sft", "--lr", "1e-5"])     # train.py's own parse
"""

import importlib
import sys
from dataclasses import dataclass
from typing import Literal

import gymnasium as gym

import envs
from plumbing import checkpoint
from plumbing.flags import invalid, parse_dataclass
from plumbing.tinyvlm import TINY_MODELS, WARM_START_MAX_STEPS, WARM_START_STEPS


@dataclass
class Args:
    env: str = "gtr/NumberLine-v0"
    """gymnasium id: gtr/{NumberLine, EZPoints, Points24, Blackjack, Household, ALFWorld}-v0"""
    model: str = "tiny"
    """hub id or folder of a Qwen2(.5)-VL checkpoint; built offline: tiny, tiny-qwen2.5-vl,
    tiny-qwen3-vl, random-qwen2.5-vl-3b/7b"""
    guidance: Literal["none", "sft", "kl"] = "kl"
    """teacher guidance: none (RL4VLM PPO), sft (docs/ALGORITHM.md §4.2) or kl (§4.3)"""
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
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto, cpu, cuda"""
    gradient_checkpointing: Literal["auto", "on", "off"] = "auto"
    """recompute activations in backward: on, off, auto (on for a real model, off for tiny ones)"""
    image_size: int = 0
    """resize observations to this many pixels before the processor (0: the model's default)"""
    # Sampling, the answer's log-prob and its reward (docs/ALGORITHM.md §2-3)
    temperature: float = 0.5
    """sampling temperature; logits are divided by it when evaluating too (paper: 0.2)"""
    max_new_tokens: int = 64
    """longest answer in tokens (paper: 256)"""
    thought_coef: float = 0.5
    """lambda: thoughts' weight in the action log-prob (0.5 card games; 0.2 Household, ALFWorld)"""
    format_reward: float = 3.0
    """reward of an answer that parses, added after GAE (Household: 5); 0 here and in
    --format-penalty turns the format reward off"""
    format_penalty: float = -2.0
    """reward for an answer that does not parse (Household, ALFWorld: -5)"""
    # PPO (docs/ALGORITHM.md §3)
    gamma: float = 0.9
    """discount"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    clip: float = 0.1
    """PPO clip range"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.01
    """gradient norm clip"""
    target_kl: float = 0.02
    """end an update's PPO epochs before a step whose mini-batch approx_kl > 1.5x this (0: never)"""
    ppo_epochs: int = 4
    """PPO epochs per update"""
    minibatch_size: int = 32
    """samples per optimizer step (paper: 128 by gradient accumulation)"""
    micro_batch_size: int = 32
    """samples per forward pass; gradients are accumulated over a mini-batch (GPU, 3B model: 4)"""
    lr: float = 3e-5
    """Adam learning rate, cosine-annealed to lr_min (paper: 1e-5)"""
    lr_min: float = 1e-9
    """final learning rate"""
    critic_lr: float = 1e-4
    """Adam learning rate of the critic (value head, critic adapter), cosine-annealed like --lr"""
    # LoRA
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
    # The GTR-Turbo teacher (docs/ALGORITHM.md §4)
    kl_coef: float = 1.0
    """beta: weight of the teacher KL subtracted from the advantages"""
    sft_coef: float = 1.0
    """weight of the SFT loss on the teacher's thoughts"""
    teacher_temperature: float = 0.2
    """teacher's SFT answers' first temperature, x1.1 per retry (paper: 0.2; scored at 1, §4.2)"""
    merge: Literal["ties", "linear", "dare"] = "ties"
    """merge operator: ties, linear, dare"""
    merge_weights: Literal["ema", "sma"] = "ema"
    """teacher update weights: ema (alpha, 1-alpha) or sma (1/k, (k-1)/k)"""
    ema_alpha: float = 0.5
    """EMA weight of the newest checkpoint"""
    ties_density: float = 0.8
    """fraction of entries TIES (and DARE) keep"""
    merge_every: int = 1
    """merge the policy into the teacher every this many updates (0: never: teacher = warm start)"""
    init: str = ""
    """start from this saved policy adapter, e.g. a warm start's OUT/checkpoint/adapters/policy"""
    # SFT warm start on the environments' expert demonstrations (the paper starts RL from SFT)
    warmup_sft_steps: int = -1
    """optimizer steps of SFT on expert demonstrations before RL (0: none; -1: 200 for a tiny
    --model without --init, else 0: a real checkpoint gets this toy warm start only when given N)"""
    warmup_target_loss: float = 0.0
    """the warm start stops once its held-out SFT loss per answer token is at most this (checked
    every 50 steps; --warmup-sft-steps -1 then allows up to 1000 steps; 0: all the steps;
    NumberLine: 0.05, where its warm starts read the picture)"""
    warmup_lr: float = 1e-3
    """learning rate of the warm start"""
    warmup_batch_size: int = 32
    """demonstrations per warm-start step"""
    # Checkpoints, evaluation, logging
    save_every: int = 5
    """write OUT/checkpoint every this many updates (and after the last)"""
    keep_checkpoints: int = 2
    """checkpoints kept (OUT/checkpoint, OUT/checkpoint.1, ...): --resume falls back to the
    previous one when the newest is cut short or corrupt"""
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
    tensorboard: bool = False
    """also log metrics and evaluations to TensorBoard, OUT/tensorboard (pip install tensorboard)"""
    wandb: str = ""
    """also log to this Weights & Biases project (pip install wandb; offline: WANDB_MODE=offline)"""
    # ---- The reference's semantics and the paper's ablations --------------------------------
    # Where the reference's code and this repository differ, a flag below chooses between them
    # (its help says which value is the reference's; docs/ALGORITHM.md §6), or it runs one of the
    # paper's ablations (§4.3). A first reading can skip them.
    critic: Literal["shared", "detached", "adapter"] = "adapter"
    """what the value head reads: adapter (its own LoRA adapter), shared (the policy's last prompt
    state, the reference's), detached (the same, gradient stopped)"""
    critic_max_grad_norm: float = 1.0
    """gradient norm clip of the critic's weights, apart from the actor's --max-grad-norm"""
    value_norm: bool = True
    """the critic regresses returns normalised by their running mean and standard deviation"""
    value_clip: float = 0.0
    """PPO2's value clip: V kept within this of its rollout value (the reference: 0.1; 0: off)"""
    value_target: Literal["env", "shaped"] = "env"
    """critic's target: env (the env's return) or shaped (+ format bonus, KL penalty; reference)"""
    critic_warmup: int = 0
    """the first this many updates train the critic only (the actor's learning rate is 0)"""
    ratio_guard: float = 10.0
    """a sample whose ratio exceeds this uses only the clipped term (drops out of the step)"""
    lr_updates: int = 0
    """updates over which the learning rate anneals (0: all of --updates; paper: 25)"""
    unparsed_action: Literal["random", "penalty"] = "random"
    """unparsed answers play: random (the reference) or penalty (the env's illegal-move penalty)"""
    kl_estimator: Literal["clip", "abs", "k3", "forward"] = "clip"
    """per-token KL estimator: clip (paper), abs, k3, forward"""
    kl_temperature: float = 1.0
    """temperature of both policies' KL scoring (1: raw logits, the reference; -1: --temperature)"""
    unparsed_kl: float = 100.0
    """KL_hat of an unparsed answer's step (reference: 100; 0: score its tokens as if it parsed)"""
    sft_unparsed: Literal["none", "teacher"] = "none"
    """SFT target where the agent's answer does not parse: none (the reference) or teacher (its
    answer, the action played)"""
    sft_batch: Literal["replay", "rollout"] = "replay"
    """SFT targets per PPO mini-batch: replay (the reference: as many drawn from every target since
    update 1, each target's token mean over the mini-batch's sample count) or rollout (this
    rollout's, scored with the mini-batch, a mean over its guided tokens; §4.2)"""
    guide_tokens: Literal["thought", "all"] = "thought"
    """tokens the teacher guides: thought (paper) or all (ablation: KL and SFT on every token)"""
    merge_space: Literal["factors", "delta"] = "factors"
    """merge LoRA A and B factors (the reference) or their product B@A (delta)"""
    merge_snapshot: Literal["update", "epoch"] = "update"
    """what is merged: update (the policy after its PPO epochs) or epoch (the snapshots after each
    epoch share its weight, the reference)"""
    teacher: str = ""
    """fixed teacher adapter folder, not the merged one (GTR with local teacher; static ablation)"""

def check_args(args):
    """Every flag's value in its range, else the one line that names the flag, its value and what
    is valid (scripts/bench.py checks its flags here too)."""
    for name in ("num_envs", "steps_per_update", "max_new_tokens", "temperature", "clip",
                 "max_grad_norm", "ppo_epochs", "minibatch_size", "micro_batch_size", "lr",
                 "lora_r", "lora_alpha", "critic_lr", "critic_max_grad_norm", "warmup_lr",
                 "warmup_batch_size", "save_every", "teacher_temperature"):
        if getattr(args, name) <= 0:
            invalid(name, getattr(args, name), "positive")
    for name in ("updates", "seed", "thought_coef", "vf_coef", "target_kl", "lr_min",
                 "lr_updates", "kl_coef", "sft_coef", "value_clip", "unparsed_kl", "critic_warmup",
                 "warmup_target_loss",
                 "eval_episodes", "eval_every", "merge_every"):
        if getattr(args, name) < 0:
            invalid(name, getattr(args, name), "non-negative")
    if not 1 <= args.keep_checkpoints <= checkpoint.MAX_KEPT:
        invalid("keep_checkpoints", args.keep_checkpoints, f"in [1, {checkpoint.MAX_KEPT}]")
    for name in ("gamma", "gae_lambda"):
        if not 0 <= getattr(args, name) <= 1:
            invalid(name, getattr(args, name), "in [0, 1]")
    for name in ("ema_alpha", "ties_density"):
        if not 0 < getattr(args, name) <= 1:
            invalid(name, getattr(args, name), "in (0, 1]")
    if not 0 <= args.lora_dropout < 1:
        invalid("lora_dropout", args.lora_dropout, "in [0, 1)")
    if args.ratio_guard <= 1:
        invalid("ratio_guard", args.ratio_guard, "greater than 1")
    if 0 < args.image_size < 28 or args.image_size < 0:
        invalid("image_size", args.image_size, "0 (the model's own) or at least 28")
    if args.eval_temperature < 0 and args.eval_temperature != -1:
        invalid("eval_temperature", args.eval_temperature,
                "-1 (the sampling temperature) or non-negative")
    if args.kl_temperature <= 0 and args.kl_temperature != -1:
        invalid("kl_temperature", args.kl_temperature, "-1 (the sampling temperature) or positive")
    if args.warmup_sft_steps < -1:
        invalid("warmup_sft_steps", args.warmup_sft_steps, "-1 (auto) or non-negative")


def resolve_warmup(args):
    """--warmup-sft-steps -1 made explicit: for a tiny model that starts afresh, its family's
    steps (200 on the card games; 800 on the household), or up to 1000 where the warm start stops
    at --warmup-target-loss (NumberLine: its seeds learn to read the picture after 200 to more
    than 500 steps);
    none for a real checkpoint, whose RL starts from its own SFT (hundreds of steps at lr 1e-3 on
    the bundled experts would overwrite a pretrained 7B), or from an --init adapter."""
    if args.warmup_sft_steps == -1:
        tiny = args.model in TINY_MODELS and not args.init
        family = envs.FAMILY_OF.get(args.env, "cards")
        steps = WARM_START_MAX_STEPS if args.warmup_target_loss else WARM_START_STEPS[family]
        args.warmup_sft_steps = steps if tiny else 0
    return args


def check_extras(args):
    """--tensorboard, --wandb and --env gtr/ALFWorld-v0 need optional packages (and ALFWorld its
    game files): say which, before anything runs."""
    for package in ("tensorboard", "wandb"):
        try:
            if getattr(args, package):
                importlib.import_module(package)
        except ImportError:
            sys.exit(f"--{package} needs the {package} package, an optional extra: "
                     f"pip install {package}")
    missing = envs.REQUIREMENTS[args.env]() if args.env in envs.REQUIREMENTS else None
    if missing:
        sys.exit(missing)


def parse_args(argv=None, description=None):
    """Train.py's flags, checked: stop early, with the fix in the message, on flags that would fail
    deep in a library. `description` heads --help (train.py's docstring)."""
    args = parse_dataclass(Args, argv, description)
    # lambda and the format reward of the paper's ALFWorld runs (README)
    if args.env in envs.ENV_DEFAULTS:
        args = parse_dataclass(Args, argv, description, defaults=envs.ENV_DEFAULTS[args.env])
    check_args(args)
    if args.env not in gym.registry:
        sys.exit(f"--env {args.env!r} is not a registered gymnasium id; "
                 f"bundled: {', '.join(envs.ENV_IDS)}")
    if args.steps_per_update % args.num_envs:
        sys.exit(f"--steps-per-update {args.steps_per_update} must be a multiple of "
                 f"--num-envs {args.num_envs}")
    if args.eval_only and not args.resume:
        sys.exit("--eval-only evaluates a saved run: add --resume (and --out RUN)")
    check_extras(args)
    return resolve_warmup(args)
