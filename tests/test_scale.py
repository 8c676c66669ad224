"""Operations: torchrun across processes, kill-and-resume, incompatible resumes, evaluation."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--max-new-tokens", "16", "--lora-r", "8", "--lora-alpha", "16", "--ppo-epochs", "1",
        "--micro-batch-size", "4", "--eval-episodes", "0", "--warmup-sft-steps", "0"]


def train(tiny_dir, *flags, launcher=(sys.executable,), check=True):
    cmd = [*launcher, os.path.join(ROOT, "train.py"), *TINY, *flags]
    result = subprocess.run(cmd, cwd=os.path.dirname(tiny_dir), capture_output=True, text=True, timeout=400)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def updates(out):
    return [json.loads(line)["update"] for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.mark.parametrize("guidance", ["kl", "sft"])
def test_two_processes_agree(tiny_dir, tmp_path, guidance):
    """torchrun with 2 gloo ranks: one update, then both ranks hold identical policy and teacher.
    With SFT, a short warm start makes the teacher's answers parse, so that the SFT term (the
    teacher's answers on the shared prompts) is part of the all-reduced gradient."""
    out = tmp_path / "ddp"
    warm = ["--warmup-sft-steps", "20", "--max-new-tokens", "32", "--lora-r", "128", "--lora-alpha", "256"] \
        if guidance == "sft" else []
    train(tiny_dir, "--out", str(out), "--num-envs", "2", "--steps-per-update", "4", "--updates", "1",
          "--minibatch-size", "4", "--guidance", guidance, *warm,
          launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master-port=29517"))
    if guidance == "sft":
        last = [json.loads(line) for line in open(out / "metrics.jsonl")][-1]
        assert last["teacher_parse_rate"] > 0 and last["sft_loss"] > 0
    ranks = [pickle.load(open(out / "checkpoint" / f"rank{r}.pkl", "rb")) for r in range(2)]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    # Distinct seeds: every environment of both ranks has its own random stream.
    streams = [str(e.unwrapped.np_random.bit_generator.state) for r in ranks for e in r["runner"].envs]
    assert len(set(streams)) == len(streams) == 4
    assert json.load(open(out / "config.json"))["world_size"] == 2
    assert updates(out)[-1] == 1


def test_kill_and_resume_continues_without_gap(tiny_dir, tmp_path):
    out = tmp_path / "run"
    flags = ["--out", str(out), "--num-envs", "2", "--steps-per-update", "4", "--minibatch-size", "4",
             "--save-every", "1", "--guidance", "kl"]
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *TINY, *flags, "--updates", "50"],
                               cwd=os.path.dirname(tiny_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill it once a few updates are logged and saved
        if os.path.exists(out / "metrics.jsonl") and len(updates(out)) >= 3:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    logged = updates(out)
    assert len(logged) >= 3
    # What a kill during a save's clean-up leaves: a half-deleted previous checkpoint.
    os.makedirs(out / "checkpoint.old" / "adapters", exist_ok=True)
    train(tiny_dir, *flags, "--updates", str(logged[-1] + 2), "--resume")
    resumed = updates(out)
    assert resumed == list(range(1, logged[-1] + 3))  # no gap, no duplicate
    steps = [json.loads(line)["env_steps"] for line in open(out / "metrics.jsonl")]
    assert steps == [4 * u for u in resumed]


def test_resume_on_another_number_of_processes(tiny_dir, tmp_path):
    """A 2-process run resumed by 1 process carries the adapters, optimizer, teacher and counters
    over, deals the environments afresh with a warning, and continues the metrics without a gap."""
    import torch
    out = tmp_path / "run"
    flags = ["--out", str(out), "--num-envs", "2", "--steps-per-update", "4", "--minibatch-size", "4",
             "--guidance", "kl"]
    train(tiny_dir, *flags, "--updates", "1",
          launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master-port=29519"))
    result = train(tiny_dir, *flags, "--updates", "2", "--resume")
    assert "the environments are dealt afresh" in result.stderr
    assert updates(out) == [1, 2]
    assert [json.loads(line)["env_steps"] for line in open(out / "metrics.jsonl")] == [8, 12]
    trainer = torch.load(out / "checkpoint" / "trainer.pt", weights_only=False)
    assert trainer["merges"] == 2 and trainer["world_size"] == 1 and trainer["update"] == 2


def test_incompatible_resume_fails_clearly(tiny_dir, tmp_path):
    out = tmp_path / "run"
    base = ["--out", str(out), "--num-envs", "2", "--steps-per-update", "4", "--minibatch-size", "4",
            "--updates", "1", "--guidance", "none"]
    train(tiny_dir, *base)
    result = train(tiny_dir, *base, "--resume", "--env", "gtr/Blackjack-v0", check=False)
    assert result.returncode != 0
    assert "trained with other settings" in result.stderr and "--env" in result.stderr
    result = train(tiny_dir, "--out", str(tmp_path / "empty"), "--resume", check=False)
    assert result.returncode != 0 and "no checkpoint" in result.stderr


def test_eval_only_reports_success_with_stderr(tiny_dir, tmp_path):
    out = tmp_path / "run"
    base = ["--out", str(out), "--num-envs", "2", "--steps-per-update", "4", "--minibatch-size", "4",
            "--updates", "1", "--guidance", "none"]
    train(tiny_dir, *base)
    result = train(tiny_dir, *base, "--resume", "--eval-only", "--eval-episodes", "6")
    row = json.loads(open(out / "eval.jsonl").readlines()[-1])
    assert row["eval_episodes"] == 6 and 0.0 <= row["eval_success_rate"] <= 1.0
    assert "+-" in result.stderr + result.stdout


def test_warm_start_checkpoint_seeds_other_runs(tiny_dir, tmp_path):
    """A warm start alone (--updates 0) leaves a checkpoint at update 0; --init starts RL from
    its policy, and an adapter of another rank is refused with the flag to fix."""
    warm = tmp_path / "warm"
    flags = ["--num-envs", "2", "--steps-per-update", "4", "--minibatch-size", "4", "--warmup-batch-size", "4"]
    train(tiny_dir, "--out", str(warm), *flags, "--warmup-sft-steps", "2", "--updates", "0")
    assert updates(warm) == [0]
    policy = warm / "checkpoint" / "adapters" / "policy"
    assert (policy / "adapter_config.json").exists() and (policy / "value_head.pt").exists()
    out = tmp_path / "rl"
    train(tiny_dir, "--out", str(out), *flags, "--updates", "1", "--guidance", "kl", "--init", str(policy))
    assert updates(out) == [1]
    result = train(tiny_dir, "--out", str(tmp_path / "bad"), *flags, "--updates", "1", "--init", str(policy),
                   "--lora-r", "16", check=False)
    assert result.returncode != 0 and "--lora-r 8" in result.stderr
