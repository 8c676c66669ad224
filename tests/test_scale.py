"""Operations: torchrun across processes, kill-and-resume, incompatible resumes, evaluation."""
import contextlib
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

pytestmark = pytest.mark.slow  # processes, torchrun and resumes


def descendants(pid):
    """Ids of every process below `pid`, read from Linux's /proc (torchrun starts each rank in a
    session of its own, so killing a process group would miss them)."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])  # the field after the state
        except (OSError, ValueError, IndexError):  # exited meanwhile
            continue
        children.setdefault(parent, []).append(int(entry))
    found = list(children.get(pid, []))
    for child in found:  # the list grows as the loop goes: children's children
        found += children.get(child, [])
    return found


def train(tiny_dir, *flags, launcher=(sys.executable,), check=True, timeout=400):
    """train.py's result, under a hang guard: a run that has not exited after `timeout` seconds
    fails the test, once every process it started (torchrun's ranks too) is killed; a hung rank
    left alive would hold the output pipes open for good."""
    cmd = [*launcher, os.path.join(ROOT, "train.py"), *TINY, *flags]
    with subprocess.Popen(cmd, cwd=os.path.dirname(tiny_dir), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for pid in [*descendants(process.pid), process.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            pytest.fail(f"train.py did not exit within {timeout} s:\n{stderr[-3000:]}")
    result = subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def updates(out):
    return [json.loads(line)["update"] for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.mark.parametrize("guidance", ["kl", "sft"])
def test_two_processes_agree(tiny_dir, tmp_path, guidance):
    """torchrun with 2 gloo ranks: one update, then both ranks hold identical policy and teacher.
    With SFT, a short warm start makes the teacher's answers parse, so that the SFT term (the
    teacher's answers on the shared prompts) is part of the all-reduced gradient.

    Both processes exit after the final evaluation, within train's hang guard: were DDP's
    reducer to outlive the process group (train.py:shutdown_distributed), gloo's teardown would
    deadlock, at this size in about one run of two on 2 CPU cores."""
    out = tmp_path / "ddp"
    warm = (["--warmup-sft-steps", "20", "--max-new-tokens", "32", "--lora-r", "128",
             "--lora-alpha", "256"] if guidance == "sft" else [])
    train(tiny_dir, "--out", str(out), "--num-envs", "2", "--steps-per-update", "4",
          "--updates", "1", "--minibatch-size", "4", "--guidance", guidance,
          "--eval-episodes", "2", *warm,
          timeout=240,
          launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                    "--master-port=29517"))
    if guidance == "sft":
        last = [json.loads(line) for line in open(out / "metrics.jsonl")][-1]
        assert last["teacher_parse_rate"] > 0 and last["sft_loss"] > 0
    ranks = [pickle.load(open(out / "checkpoint" / f"rank{r}.pkl", "rb")) for r in range(2)]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    # Distinct seeds: every environment of both ranks has its own random stream.
    streams = [str(e.unwrapped.np_random.bit_generator.state)
               for r in ranks for e in r["runner"].envs]
    assert len(set(streams)) == len(streams) == 4
    assert json.load(open(out / "config.json"))["world_size"] == 2
    assert updates(out)[-1] == 1


def test_kill_and_resume_continues_without_gap(tiny_dir, tmp_path):
    out = tmp_path / "run"
    flags = ["--out", str(out), "--num-envs", "2", "--steps-per-update", "4",
             "--minibatch-size", "4", "--save-every", "1", "--guidance", "kl"]
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *TINY, *flags,
                                "--updates", "50"],
                               cwd=os.path.dirname(tiny_dir), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
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
    flags = ["--out", str(out), "--num-envs", "2", "--steps-per-update", "4",
             "--minibatch-size", "4", "--guidance", "kl"]
    train(tiny_dir, *flags, "--updates", "1", "--eval-episodes", "2", timeout=240,  # and exits
          launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                    "--master-port=29519"))
    result = train(tiny_dir, *flags, "--updates", "2", "--resume")
    assert "the environments are dealt afresh" in result.stderr
    assert updates(out) == [1, 2]
    assert [json.loads(line)["env_steps"] for line in open(out / "metrics.jsonl")] == [8, 12]
    trainer = torch.load(out / "checkpoint" / "trainer.pt", weights_only=False)
    assert trainer["merges"] == 2 and trainer["world_size"] == 1 and trainer["update"] == 2


def test_incompatible_resume_fails_clearly(tiny_dir, tmp_path):
    out = tmp_path / "run"
    base = ["--out", str(out), "--num-envs", "2", "--steps-per-update", "4",
            "--minibatch-size", "4", "--updates", "1", "--guidance", "none"]
    train(tiny_dir, *base)
    result = train(tiny_dir, *base, "--resume", "--env", "gtr/Blackjack-v0", check=False)
    assert result.returncode != 0
    assert "trained with other settings" in result.stderr and "--env" in result.stderr
    result = train(tiny_dir, "--out", str(tmp_path / "empty"), "--resume", check=False)
    assert result.returncode != 0 and "no checkpoint" in result.stderr


def test_a_cut_checkpoint_falls_back_to_the_previous_one(tiny_dir, tmp_path):
    """A trainer.pt or rank<r>.pkl cut short (a full disk, an interrupted copy) fails its
    manifest: --resume warns, naming the file, and resumes the previous checkpoint (kept by
    --keep-checkpoints 2); with no complete one left it stops with one line, no traceback."""
    out = tmp_path / "run"
    base = ["--out", str(out), "--num-envs", "2", "--steps-per-update", "4",
            "--minibatch-size", "4", "--guidance", "kl", "--save-every", "1"]
    train(tiny_dir, *base, "--updates", "3")
    assert sorted(os.listdir(out)).count("checkpoint.1") == 1
    assert "checkpoint.2" not in os.listdir(out)
    trainer = out / "checkpoint" / "trainer.pt"
    trainer.write_bytes(trainer.read_bytes()[: trainer.stat().st_size // 2])
    result = train(tiny_dir, *base, "--updates", "4", "--resume")
    assert f"{trainer} is cut short" in result.stderr and "checkpoint.1 instead" in result.stderr
    assert updates(out) == [1, 2, 3, 4]  # update 3 again, from the checkpoint of update 2
    for folder in ("checkpoint", "checkpoint.1"):
        ranks = out / folder / "rank0.pkl"
        ranks.write_bytes(ranks.read_bytes()[:100])
    result = train(tiny_dir, *base, "--updates", "5", "--resume", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "rank0.pkl is cut short" in result.stderr and "without --resume" in result.stderr


def test_eval_only_reports_success_with_stderr(tiny_dir, tmp_path):
    out = tmp_path / "run"
    base = ["--out", str(out), "--num-envs", "2", "--steps-per-update", "4",
            "--minibatch-size", "4", "--updates", "1", "--guidance", "none"]
    """--eval-only plays the checkpoint's policy on fresh episodes and appends one row: a count
    of successes out of the episodes asked for, its standard error, the same on a second call
    (evaluation draws from its own seeded generator), and printed with its +- on the console."""
    train(tiny_dir, *base)
    rows = []
    for _ in range(2):
        result = train(tiny_dir, *base, "--resume", "--eval-only", "--eval-episodes", "6")
        rows.append(json.loads(open(out / "eval.jsonl").readlines()[-1]))
    row = rows[0]
    assert row == rows[1] and row["eval_episodes"] == 6 and row["update"] == 1
    successes = row["eval_success_rate"] * 6
    assert successes == round(successes)
    p = row["eval_success_rate"]
    assert row["eval_success_stderr"] == pytest.approx((p * (1 - p) / 6) ** 0.5, abs=1e-9)
    assert f"{p:.3f} +- {row['eval_success_stderr']:.3f}" in result.stderr + result.stdout


def test_warm_start_checkpoint_seeds_other_runs(tiny_dir, tmp_path):
    """A warm start alone (--updates 0) leaves a checkpoint at update 0; --init starts RL from
    its policy, and an adapter of another rank is refused with the flag to fix."""
    warm = tmp_path / "warm"
    flags = ["--num-envs", "2", "--steps-per-update", "4", "--minibatch-size", "4",
             "--warmup-batch-size", "4"]
    train(tiny_dir, "--out", str(warm), *flags, "--warmup-sft-steps", "2", "--updates", "0")
    assert updates(warm) == [0]
    policy = warm / "checkpoint" / "adapters" / "policy"
    assert (policy / "adapter_config.json").exists() and (policy / "value_head.pt").exists()
    out = tmp_path / "rl"
    train(tiny_dir, "--out", str(out), *flags, "--updates", "1", "--guidance", "kl",
          "--init", str(policy))
    assert updates(out) == [1]
    result = train(tiny_dir, "--out", str(tmp_path / "bad"), *flags, "--updates", "1",
                   "--init", str(policy), "--lora-r", "16", check=False)
    assert result.returncode != 0 and "--lora-r 8" in result.stderr



def test_a_checkpoint_saved_on_a_gpu_loads_anywhere(tiny_dir, make_policy, tmp_path, monkeypatch):
    """trainer.pt and the value head, written as a GPU process writes them (their tensors tagged
    with its device), load on a machine without that GPU: onto the CPU, then each tensor moves to
    its parameter's device. Unmapped, torch.load would restore them onto the saving device."""
    import torch

    import envs
    from plumbing import checkpoint
    from plumbing.loader import load_policy
    from plumbing.tinyvlm import tiny_model

    policy = make_policy()
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-3)
    for p in trainable:
        p.grad = torch.randn_like(p)
    optimizer.step()  # Adam's moments: the state a resume must restore
    checkpoint.save(str(tmp_path), policy, optimizer, None, {"update": 3}, rank=0, world=1)
    path = checkpoint.latest(str(tmp_path))
    # Re-written with the storage location a tensor on a GPU gets; cuda:63 is on no machine this
    # runs on, with GPUs or without.
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:63")
    for name in ("trainer.pt", os.path.join("adapters", "policy", "value_head.pt")):
        file = os.path.join(path, name)
        torch.save(torch.load(file, weights_only=False), file)
    monkeypatch.undo()

    restored = torch.optim.Adam([torch.nn.Parameter(p.detach().clone()) for p in trainable])
    _, counters, _ = checkpoint.load(path, restored, rank=0, world=1)
    saved, loaded = optimizer.state_dict()["state"], restored.state_dict()["state"]
    assert counters["update"] == 3 and saved.keys() == loaded.keys()
    for i in saved:
        assert loaded[i]["exp_avg"].device.type == "cpu"
        assert torch.equal(saved[i]["exp_avg"], loaded[i]["exp_avg"])
    again = load_policy(tiny_model(tiny_dir), envs.action_span, lora_r=8, lora_alpha=16,
                        adapter_path=os.path.join(path, "adapters", "policy"))
    for mine, theirs in zip(policy.value_head.parameters(), again.value_head.parameters()):
        assert torch.equal(mine, theirs) and theirs.device.type == "cpu"


def test_the_base_model_loads_straight_onto_the_process_device(make_policy, monkeypatch):
    """from_pretrained is given the process's device, so the weights are read into its memory
    directly: not all into host memory first (16 GB per process for 7B) and then moved."""
    import torch
    from transformers import AutoModelForImageTextToText

    calls, original = [], AutoModelForImageTextToText.from_pretrained

    def recorded(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", recorded)
    policy = make_policy(device=torch.device("cpu"))
    assert [call.get("device_map") for call in calls] == [torch.device("cpu")]
    # Nor does transformers swap in the hub's kernels there (a download, and inference-only ones).
    assert [call.get("use_kernels") for call in calls] == [False]
    assert {p.device for p in policy.parameters()} == {torch.device("cpu")}
