"""train.py end to end on the tiny model (subprocess smoke runs, like CleanRL's) and its wiring."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The scripts run as modules of the repository (python -m scripts.x) from any folder.
SCRIPTS = dict(os.environ, PYTHONPATH=ROOT)


def script(name):
    """The command that runs scripts/<name>.py: python -m scripts.<name>."""
    return [sys.executable, "-m", f"scripts.{name}"]
METRICS = ["update", "env_steps", "success_rate", "episode_return", "episode_length",
           "format_valid", "entropy", "thought_tokens", "thought_grounding", "thought_diversity",
           "policy_loss", "value_loss", "approx_kl", "clip_fraction", "lr",
           "explained_variance", "grad_norm_critic", "opening_prob",
           "time_rollout", "time_update", "env_steps_per_s"]
GUIDANCE_METRICS = ["teacher_kl", "sft_loss", "teacher_parse_rate", "time_teacher", "time_merge"]


def train_command(out, *flags):
    """train.py with tiny sizes and 2 updates; later flags override earlier ones."""
    return [sys.executable, os.path.join(ROOT, "train.py"), "--out", str(out), "--num-envs", "4",
            "--steps-per-update", "8", "--updates", "2", "--max-new-tokens", "24", "--lora-r", "8",
            "--lora-alpha", "16", "--ppo-epochs", "1", "--minibatch-size", "8",
            "--micro-batch-size", "4", "--eval-episodes", "2", "--warmup-sft-steps", "0", *flags]


def run_train(tiny_dir, out, *flags):
    """Run train.py with tiny sizes in the folder that holds the session's tiny model cache."""
    result = subprocess.run(train_command(out, *flags), cwd=os.path.dirname(tiny_dir),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["update"] for r in rows] == [1, 2]
    assert (json.load(open(os.path.join(out, "config.json")))["guidance"]
            == flags[flags.index("--guidance") + 1])
    return rows, result


@pytest.mark.slow
@pytest.mark.parametrize("env", ["gtr/NumberLine-v0", "gtr/Points24-v0"])
def test_ppo_only_smoke(tiny_dir, tmp_path, env):
    rows, result = run_train(tiny_dir, tmp_path / "run", "--guidance", "none", "--env", env)
    for row in rows:
        assert all(k in row for k in METRICS)
        assert np.isfinite(row["policy_loss"]) and np.isfinite(row["value_loss"])
        assert 0.0 <= row["format_valid"] <= 1.0
    assert rows[-1]["env_steps"] == 16
    assert "update   2" in result.stderr + result.stdout
    assert rows[-1]["admissible"] is None  # the card games do not judge commands


@pytest.mark.slow
def test_household_reports_admissible_commands(tiny_dir, tmp_path):
    """On Household the metrics rows, the console line and the evaluation carry the share of
    answers that name an admissible command."""
    rows, result = run_train(tiny_dir, tmp_path / "run", "--guidance", "none",
                             "--env", "gtr/Household-v0", "--eval-episodes", "1")
    for row in rows:
        assert 0.0 <= row["admissible"] <= 1.0
    assert "admissible" in result.stderr + result.stdout
    evals = [json.loads(line) for line in open(tmp_path / "run" / "eval.jsonl")]
    assert 0.0 <= evals[-1]["eval_admissible"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("guidance", ["kl", "sft"])
def test_guided_smoke(tiny_dir, tmp_path, guidance):
    """Both guidances on the tiny Qwen2.5-VL in hub layout, with gradient checkpointing (the tiny
    Qwen2-VL is covered by the other smoke runs). Short answers: the untrained teacher never
    parses, so SFT guidance makes all its 20 tries."""
    rows, _ = run_train(tiny_dir, tmp_path / "run", "--guidance", guidance,
                        "--model", "tiny-qwen2.5-vl", "--gradient-checkpointing", "on",
                        "--max-new-tokens", "8")
    for row in rows:
        assert all(k in row for k in METRICS + GUIDANCE_METRICS + ["first_log_ratio_max"])
    assert rows[0]["first_log_ratio_max"] < 1e-3  # float32 on CPU: the first ratio is 1
    if guidance == "kl":
        # The teacher starts as the policy itself: a parsed answer's KL is 0, one that does not
        # parse gets the reference's 100.
        assert rows[0]["teacher_kl"] == pytest.approx(100.0 * (1.0 - rows[0]["format_valid"]))
        assert rows[1]["teacher_kl"] >= 0.0
        assert rows[0]["time_merge"] > 0.0
    else:
        # The teacher is asked only where the agent's answer parsed (none parse in 8 tokens).
        for row in rows:
            asked = row["format_valid"] > 0
            assert (row["teacher_samples"] > 0) == asked
            assert ((0.0 <= row["teacher_parse_rate"] <= 1.0) if asked
                    else row["teacher_parse_rate"] is None)
    assert os.path.exists(tmp_path / "run" / "checkpoint" / "adapters" / "teacher"
                          / "adapter_config.json")


@pytest.mark.slow
def test_sft_replay_keeps_every_step_and_resumes_with_it(tiny_dir, tmp_path):
    """--sft-batch replay: the buffer holds every step since update 1 (2 updates x 8 steps), goes
    into each checkpoint, and a resumed run adds its steps to the saved ones."""
    import pickle

    def replay_size():
        with open(tmp_path / "run" / "checkpoint" / "rank0.pkl", "rb") as f:
            return len(pickle.load(f)["replay"])

    flags = ("--guidance", "sft", "--sft-batch", "replay", "--max-new-tokens", "8")
    run_train(tiny_dir, tmp_path / "run", *flags)
    assert replay_size() == 16
    cmd = train_command(tmp_path / "run", *flags, "--resume", "--updates", "3")
    result = subprocess.run(cmd, cwd=os.path.dirname(tiny_dir), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert replay_size() == 24


@pytest.mark.slow
def test_bad_flags_fail_clearly(tiny_dir, tmp_path):
    """A bad flag stops train.py (and scripts.bench, scripts.compare) before anything runs, with
    one line that names the flag, its value and what is valid, and no traceback."""
    cases = [("train.py", ["--guidance", "gpt4"], "--guidance: invalid choice: 'gpt4'"),
             ("train.py", ["--env", "gtr/Chess-v0"], "not a registered gymnasium id"),
             ("train.py", ["--steps-per-update", "10", "--num-envs", "4"], "must be a multiple"),
             ("train.py", ["--num-envs", "0"], "--num-envs: 0 is not valid; it must be positive"),
             ("train.py", ["--lr", "-1"], "--lr: -1.0 is not valid; it must be positive"),
             ("train.py", ["--gamma", "1.5"], "--gamma: 1.5 is not valid; it must be in [0, 1]"),
             ("train.py", ["--model", "./nope"], "--model './nope': no such folder"),
             ("bench", ["--repeats", "0"], "--repeats: 0 is not valid"),
             ("compare", ["--jobs", "0"], "--jobs: 0 is not valid"),
             ("compare", ["--variants", "x=gpt4"], "--variants: 'x=gpt4' must read")]
    for program, flags, message in cases:
        command = ([sys.executable, os.path.join(ROOT, program)] if program.endswith(".py")
                   else script(program))
        result = subprocess.run([*command, *flags, "--out", str(tmp_path / "run")],
                                cwd=tmp_path, capture_output=True, text=True, timeout=120,
                                env=SCRIPTS)
        lines = [line for line in result.stderr.splitlines() if line.strip()
                 and "Warning" not in line and not line.startswith("  warnings.warn")]
        assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]


def test_teacher_config_has_the_flags_defaults():
    """teacher.py's own config (for readers who copy the file) agrees with train.py's flags."""
    import dataclasses

    from config import Args
    from teacher import TeacherConfig
    for field in dataclasses.fields(TeacherConfig):
        assert getattr(Args(), field.name) == field.default, field.name


@pytest.mark.slow
def test_help_documents_every_flag():
    import dataclasses

    from config import Args
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for f in dataclasses.fields(Args):
        assert "--" + f.name.replace("_", "-") in result.stdout


def test_teacher_adapter_equals_merged_weights(make_policy):
    """The teacher adapter computes what a model whose adapter holds the merged weights computes."""
    from merge import update_teacher
    torch.manual_seed(0)
    student = make_policy()
    student.add_teacher()
    snapshots = []
    for _ in range(3):
        with torch.no_grad():
            for name, p in student.model.named_parameters():
                if "lora_" in name and ".policy." in name:
                    p.add_(torch.randn_like(p) * 0.05)
        snapshots.append(student.adapter_state("policy"))
    teacher = None
    for k, snapshot in enumerate(snapshots, start=1):
        teacher = update_teacher(teacher, snapshot, k, scheme="sma", method="ties", density=0.8)
    student.load_adapter_state(teacher, "teacher")

    reference = make_policy()
    reference.load_adapter_state(teacher, "policy")
    images = [np.full((300, 300, 3), 255, dtype=np.uint8)]
    encoded = student.encode(images, ["prompt"])
    ids = [student.answer_ids('{"thoughts": "t", "action": "+"}')]
    with torch.no_grad(), student.use_adapter("teacher"):
        a = student(encoded, ids)["logprobs"]
    with torch.no_grad():
        b = reference(encoded, ids)["logprobs"]
        c = student(encoded, ids)["logprobs"]
    assert torch.allclose(a, b, atol=1e-6)
    assert (a - c).abs().max() > 1e-4   # and it is not the policy


@pytest.mark.slow
def test_warm_start_lowers_held_out_sft_loss(make_policy):
    """A short SFT warm start on expert demonstrations lowers the loss on held-out
    demonstrations."""
    from config import Args
    from demonstrations import warm_start
    torch.manual_seed(0)
    policy = make_policy()
    trainable = [p for p in policy.parameters() if p.requires_grad]
    args = Args(warmup_sft_steps=15, warmup_batch_size=8, num_envs=4, micro_batch_size=8,
                warmup_lr=3e-3)
    row = warm_start(policy, policy, trainable, args, rank=0, world=1)
    assert row["phase"] == "warm_start" and row["warmup_steps"] == 15
    assert row["warmup_loss_after"] < 0.7 * row["warmup_loss_before"]


@pytest.mark.slow
def test_bench_smoke(tiny_dir):
    """scripts/bench.py runs end to end and reports every ratio and figure (no timing asserted),
    here on a small random Qwen2.5-VL built like the paper-size ones
    (plumbing/tinyvlm.py:random_model), so that the MFU's FLOP count runs too (with a made-up
    peak)."""
    from plumbing.tinyvlm import random_model
    model = random_model("random-qwen2.5-vl-3b", tiny_dir, text=dict(
        num_hidden_layers=1, vocab_size=2048, hidden_size=256, intermediate_size=512,
        num_attention_heads=2, num_key_value_heads=1),
        vision=dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2,
                    fullatt_block_indexes=[0], out_hidden_size=256))
    result = subprocess.run([*script("bench"), "--json",
                             "--model", model, "--num-envs", "2",
                             "--steps-per-update", "4", "--max-new-tokens", "8",
                             "--warmup-sft-steps", "2", "--repeats", "1", "--lora-r", "8",
                             "--lora-alpha", "16", "--minibatch-size", "4",
                             "--generation-envs", "1,2", "--peak-tflops", "1"],
                            cwd=os.path.dirname(tiny_dir), capture_output=True, text=True,
                            timeout=300, env=SCRIPTS)
    assert result.returncode == 0, result.stderr[-3000:]
    ratios = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ["rollout_speedup", "kl_over_none", "sft_over_none", "merge_fraction",
                "teacher_memory_overhead", "generation_tokens_per_s_1",
                "generation_tokens_per_s_2", "seconds_ppo_update", "seconds_teacher_kl",
                "ppo_mfu"]:
        assert np.isfinite(ratios[key]) and ratios[key] > 0, key
    # shares of a whole: the merge's of the update time, the teacher's of the training memory,
    # the model FLOPs' of the (made-up, 1 TFLOP/s) peak
    assert ratios["merge_fraction"] < 1 and ratios["teacher_memory_overhead"] < 1
    assert ratios["ppo_mfu"] < 1


@pytest.mark.parametrize("guide_tokens", ["thought", "all"])
def test_sft_loss_is_that_of_the_teacher_answers_scored_alone(make_policy, guide_tokens):
    """micro_batch_loss's SFT term (the teacher's answers scored on the shared prompts) equals
    the SFT loss of those answers scored as ordinary responses at T = 1, over their thought
    tokens (--guide-tokens all: every token); a None target (the teacher never parsed) is left
    out."""
    import collections

    from config import Args
    from distill import sft_loss
    from rollout import Batch
    from train import micro_batch_loss
    torch.manual_seed(0)
    policy = make_policy()
    policy.eval()
    images = [np.random.default_rng(i).integers(0, 256, (300, 300, 3), dtype=np.uint8)
              for i in range(3)]
    answers = [policy.answer_ids('{"thoughts": "current 1, target 3", "action": "+"}'),
               policy.answer_ids('{"thoughts": "current 4, target 0", "action": "-"}'),
               policy.answer_ids('{"thoughts": "4", "action": "-"}')]
    zeros = torch.zeros(1, 3)
    batch = Batch(encoded=policy.encode(images, ["p", "q", "r"]), responses=answers,
                  token_logprobs=[], old_logprobs=zeros, values=zeros, next_values=zeros,
                  rewards=zeros, format_rewards=zeros, terminated=zeros, truncated=zeros,
                  format_valid=torch.ones(1, 3), actions=zeros, entropy=zeros,
                  thought_tokens=zeros)
    other = policy.answer_ids('{"thoughts": "current 0, target 4, so I move up", "action": "-"}')
    targets = [answers[0], other, None]
    logs = collections.defaultdict(list)
    micro_batch_loss(policy, batch, torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(3),
                     targets, 1.0, Args(guidance="sft", guide_tokens=guide_tokens), logs, [0, 1, 2])
    with torch.no_grad():
        expected = policy(batch.encoded[:2], [answers[0], other], 1.0)
    mask = expected["response_mask"] & (
        expected["thought_mask"] if guide_tokens == "thought" else True)
    assert logs["sft_loss"][0] == pytest.approx(sft_loss(expected["logprobs"], mask).item(),
                                                abs=1e-5)


def test_critic_learns_the_environment_return_and_bonuses_move_only_their_step():
    """The format bonus and the KL penalty shift only their own step's advantage; the critic's
    target is the environment's GAE return. (A critic trained on r + bonus, the reference's
    way, makes V(s') carry all future bonuses, which pays the agent for not finishing.)"""
    from config import Args
    from ppo import gae, normalize_advantages
    from rollout import Batch
    from teacher import Guidance
    from train import advantages_and_returns

    def col(*x):
        return torch.tensor(x, dtype=torch.float32)[:, None]  # [T, 1]

    zeros = col(0.0, 0.0, 0.0)
    batch = Batch(encoded=[], responses=[], token_logprobs=[], old_logprobs=zeros,
                  values=col(2.0, 5.0, 9.0), next_values=col(5.0, 9.0, 0.0),
                  rewards=col(0.0, -1.0, 1.0), format_rewards=col(3.0, -2.0, 3.0),
                  terminated=col(0.0, 0.0, 1.0), truncated=zeros,
                  format_valid=zeros, actions=zeros, entropy=zeros, thought_tokens=zeros)
    env_adv, env_ret = gae(batch.rewards, batch.values, batch.next_values, batch.terminated,
                           batch.truncated, 0.9, 0.95)
    guidance = Guidance(teacher_kl=col(0.5, 0.0, 2.0), sft_targets=None, parse_rate=float("nan"),
                        seconds=0.0)
    adv, ret, diagnostics = advantages_and_returns(batch, guidance,
                                                   Args(guidance="kl", kl_coef=1.0))
    shaped = env_adv + batch.format_rewards - guidance.teacher_kl  # A' = A + b - beta * KL
    assert torch.allclose(adv, normalize_advantages(shaped.flatten()))
    assert torch.allclose(ret, env_ret.flatten())
    assert 0.0 < diagnostics["adv_var_env"] and 0.0 < diagnostics["adv_var_format"]
    _, ret, _ = advantages_and_returns(batch, guidance,
                                       Args(guidance="kl", kl_coef=1.0, value_target="shaped"))
    assert torch.allclose(ret, (env_ret + batch.format_rewards - guidance.teacher_kl).flatten())


def test_readme_states_the_default_configuration():
    """The README's quick start runs `torchrun train.py` with no flags, and its table of the
    default run's flags holds train.py's actual defaults."""
    import re

    from config import Args
    readme = open(os.path.join(ROOT, "README.md")).read()
    quick_start = readme.split("## Quick start")[1].split("```")[1]
    assert re.search(r"^torchrun train\.py +#", quick_start, flags=re.M)
    assert "python -m pytest -q tests" in quick_start
    section = readme.split("## The default run")[1].split("\n## ")[0]
    rows = re.findall(r"^\| `--([\w-]+)` \| `([^`]*)` \|", section, flags=re.M)
    assert len(rows) >= 8
    defaults = Args()
    for flag, value in rows:
        assert str(getattr(defaults, flag.replace("-", "_"))) == value, (
            f"README says --{flag} {value}")


@pytest.mark.slow
def test_tensorboard_and_wandb_log_every_metric(tiny_dir, tmp_path, monkeypatch):
    """--tensorboard and --wandb (offline, no network) get every metrics key and the evaluations."""
    for extra in ("tensorboard", "wandb"):
        pytest.importorskip(extra, reason=f"{extra} is an optional extra (requirements-dev.txt)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    rows, _ = run_train(tiny_dir, run, "--guidance", "kl", "--tensorboard", "--wandb", "gtr-test")
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    numeric = {k for k, v in rows[-1].items() if isinstance(v, (int, float)) and k != "update"}
    assert numeric <= tags and "eval/eval_success_rate" in tags
    assert [e.step for e in events.Scalars("approx_kl")] == [1, 2]
    assert list((run / "wandb").glob("offline-run-*/*.wandb"))


@pytest.mark.slow
def test_missing_logging_extra_is_named_in_one_line(tmp_path):
    code = (f"import sys, runpy; sys.path.insert(0, {ROOT!r}); sys.modules['tensorboard'] = None; "
            f"sys.argv = ['train.py', '--tensorboard', '--out', {str(tmp_path / 'run')!r}]; "
            f"runpy.run_path({os.path.join(ROOT, 'train.py')!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert ("--tensorboard needs the tensorboard package, an optional extra: "
            "pip install tensorboard") in result.stderr


@pytest.mark.slow
def test_plot_draws_a_run(tiny_dir, tmp_path):
    """scripts/plot.py draws a short run (its metrics and evaluations) into one PNG."""
    pytest.importorskip("matplotlib",
                        reason="matplotlib is an optional extra (requirements-dev.txt)")
    run = tmp_path / "run"
    run_train(tiny_dir, run, "--guidance", "kl")
    result = subprocess.run([*script("plot"), str(run), "--smooth", "2"],
                            capture_output=True, text=True, timeout=120, env=SCRIPTS)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (run / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # What it draws: a line for each panel's metric the run logged, the evaluations (one after
    # the last update) with their error bars on the first panel.
    from scripts.plot import PANELS, figure
    fig = figure([str(run)], 2)
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    for ax, (title, keys) in zip(fig.axes, PANELS):
        logged = [k for k in keys if any(r.get(k) is not None for r in rows)]
        assert len(ax.lines) >= len(logged), title
    assert len(fig.axes[0].containers) == 1  # the final evaluation's error bar
    result = subprocess.run([*script("plot"), str(tmp_path / "none")],
                            capture_output=True, text=True, timeout=120, env=SCRIPTS)
    assert result.returncode != 0 and "no metrics.jsonl there" in result.stderr


@pytest.mark.slow
def test_compare_smoke(tiny_dir, tmp_path):
    """scripts/compare.py runs a warm start and the three methods from it, and writes the
    table. Run again, it keeps every finished run; a warm start made by other code (another code
    digest in its config.json) is trained again, and every run that starts from it is rerun."""
    small = "--num-envs 2 --lora-r 8 --lora-alpha 16 --max-new-tokens 16"

    def compare(methods="none,sft,kl"):
        result = subprocess.run([*script("compare"), "--seeds", "1", "--envs",
                                 "gtr/NumberLine-v0", "--updates", "1",
                                 "--methods", methods,
                                 "--jobs", "1", "--eval-episodes", "2",
                                 f"--warmup-flags=--warmup-sft-steps 2 --warmup-batch-size 4 "
                                 f"{small}",
                                 "--train-flags=--steps-per-update 4 --minibatch-size 4 "
                                 f"--ppo-epochs 1 {small}",
                                 "--out", str(tmp_path / "runs"), "--docs", str(tmp_path)],
                                cwd=os.path.dirname(tiny_dir), capture_output=True, text=True,
                                timeout=600, env=SCRIPTS)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        return re.findall(r"^(gtr/\S+ \w+ seed \d+): \d+ s$", result.stdout, re.MULTILINE)

    assert len(compare()) == 4  # the warm start and three methods
    table = open(tmp_path / "comparison.md").read()
    methods = ("PPO only (RL4VLM)", "GTR-Turbo SFT", "GTR-Turbo KL")
    for method in methods:
        assert f"| NumberLine-v0 | {method} |" in table  # its row of the summary
        assert f"| NumberLine-v0 | {method} | 0 |" in table  # and of the per-seed table
    assert "| NumberLine-v0 | GTR-Turbo KL minus PPO only (RL4VLM) | 1 |" in table
    assert "Code: commit " in table and "python -m scripts.compare " in table
    assert compare() == []
    config_path = tmp_path / "runs" / "NumberLine-v0" / "warm" / "seed0" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config | {"code_digest": "another version"}))
    assert compare("none") == ["gtr/NumberLine-v0 warm seed 0", "gtr/NumberLine-v0 none seed 0"]
