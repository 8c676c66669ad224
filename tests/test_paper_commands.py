"""The paper's experiments as the README runs them: each command parses, through train.py's own
parse_args, to the reference's hyperparameters; the warm start and the learning-rate schedule at
the paper's scale."""
import math
import os
import re
import shlex

import pytest

import envs
from train import learning_rate, parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The reference's settings that hold whatever the environment, the model or the number of GPUs.
PAPER = dict(guidance="kl", temperature=0.2, lr=1e-5, lr_min=1e-9, lr_updates=25,
             max_new_tokens=256, micro_batch_size=4, gamma=0.9, gae_lambda=0.95, clip=0.1,
             ppo_epochs=4, max_grad_norm=0.01, vf_coef=0.5, kl_coef=1.0, merge="ties",
             merge_weights="ema", ema_alpha=0.5, ties_density=0.8, target_kl=0.0,
             value_target="shaped", value_clip=0.1, merge_snapshot="epoch", warmup_sft_steps=0,
             critic="shared", critic_lr=1e-5, critic_max_grad_norm=0.01, value_norm=False)
# Per environment: lambda, the format reward and penalty, and the environment steps of the run.
PER_ENV = {
    "gtr/Points24-v0": (dict(thought_coef=0.5, format_reward=3.0, format_penalty=-2.0), 30_000),
    "gtr/ALFWorld-v0": (dict(thought_coef=0.2, format_reward=5.0, format_penalty=-5.0), 20_000)}


def readme_commands():
    """(processes in all, train.py's flags) of each torchrun line of the README's section."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme.split("### The paper's experiments")[1].split("\n#")[0]
    code = " ".join(re.findall(r"```bash\n(.*?)```", section, flags=re.S)).replace("\\\n", " ")
    variables = dict(re.findall(r'^(\w+)="([^"]*)"$', code, flags=re.M))  # the shared flags
    commands = []
    for line in code.splitlines():
        for name, value in variables.items():
            line = line.replace(f"${name}", value)
        words = shlex.split(line)
        if not words or words[0] != "torchrun":
            continue
        launcher = words[:words.index("train.py")]
        sizes = dict(w.split("=") for w in launcher if "=" in w)
        world = int(sizes.get("--nnodes", 1)) * int(sizes.get("--nproc_per_node", 1))
        commands.append((world, words[len(launcher) + 1:]))
    return commands


def test_readme_runs_each_paper_experiment_with_the_reference_settings(monkeypatch):
    """Points24 and ALFWorld at 7B and 3B; a renamed flag or a changed default fails here."""
    monkeypatch.setitem(envs.REQUIREMENTS, "gtr/ALFWorld-v0", lambda: None)  # no game files needed
    commands = readme_commands()
    runs = set()
    for world, flags in commands:
        args = parse_args(flags)
        expected, env_steps = PER_ENV[args.env]
        for name, value in (PAPER | expected).items():
            got = getattr(args, name)
            expect = pytest.approx(value) if isinstance(value, float) else value
            assert got == expect, (flags, name, got)
        # --steps-per-update and --minibatch-size are per process; DDP averages the gradients.
        assert args.steps_per_update * world == 1024 and args.minibatch_size * world == 128, flags
        assert args.updates * 1024 >= env_steps > (args.updates - 1) * 1024, flags
        size = re.search(r"(\d+)b$", args.model.lower()).group(1)
        runs.add((args.env, size))
    assert runs == {(env, size) for env in PER_ENV for size in ("3", "7")}


def test_warm_start_is_the_tiny_models_only_unless_asked():
    """-1 (the default): 200 steps for a tiny model that starts afresh on the card games, 800 on
    the household, up to 1000 where it stops at a held-out loss (NumberLine's 0.05); none for a
    real checkpoint (a hub id or a folder), a random paper-size model, or an --init adapter."""
    assert parse_args([]).warmup_sft_steps == 1000 and parse_args([]).warmup_target_loss == 0.05
    ez_points = ["--env", "gtr/EZPoints-v0"]
    assert parse_args(ez_points).warmup_sft_steps == 200
    assert parse_args([*ez_points, "--model", "tiny-qwen2.5-vl"]).warmup_sft_steps == 200
    assert parse_args(["--env", "gtr/Household-v0"]).warmup_sft_steps == 800
    household_7b = ["--env", "gtr/Household-v0", "--model", "Qwen/Qwen2.5-VL-7B-Instruct"]
    assert parse_args(household_7b).warmup_sft_steps == 0
    for model in ("Qwen/Qwen2.5-VL-7B-Instruct", "./sft-qwen2.5-vl-7b", "random-qwen2.5-vl-3b"):
        assert parse_args(["--model", model]).warmup_sft_steps == 0
    assert parse_args(["--init", "runs/warm/checkpoint/adapters/policy"]).warmup_sft_steps == 0
    asked = ["--model", "Qwen/Qwen2.5-VL-7B-Instruct", "--warmup-sft-steps", "50"]
    assert parse_args(asked).warmup_sft_steps == 50
    assert parse_args(["--warmup-sft-steps", "0"]).warmup_sft_steps == 0


def test_lr_updates_gives_the_papers_25_update_cosine():
    """1e-5 at update 1, cosine-annealed to 1e-9 at update 26 (one scheduler step per update),
    and held there after: the reference's CosineAnnealingLR(T_max=25) over its 25 updates."""
    args = parse_args(["--lr", "1e-5", "--lr-updates", "25", "--updates", "30"])
    rates = [learning_rate(update, args) for update in range(1, 31)]  # updates 1-30
    cosine = [1e-9 + (1e-5 - 1e-9) * (1 + math.cos(math.pi * s / 25)) / 2 for s in range(26)]
    assert rates[0] == 1e-5 and rates[:26] == pytest.approx(cosine, rel=1e-9, abs=0)
    assert rates[24] > 1e-9 and rates[25:] == pytest.approx([1e-9] * 5, rel=1e-9, abs=0)
