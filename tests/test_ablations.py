"""The ablation flags of GTR-Turbo's teacher do what they claim: a static teacher (--merge-every 0),
the reference's merge of the PPO epochs' snapshots (--merge-snapshot epoch) and guiding the action
tokens as well (--guide-tokens all). docs/ALGORITHM.md §4.1, §4.3. (--merge-weights, --merge and
--kl-estimator are tested in test_merge.py and test_distill.py.)"""
import contextlib
import json
import os

import numpy as np
import pytest
import torch

import envs
from config import Args
from envs.answer import thought_action_masks
from rollout import Batch
from teacher import Teacher
from train import actor_critic_optimizer, ppo_update

ANSWERS = ['{"thoughts": "current 1, target 3, so I move up", "action": "+"}',
           '{"thoughts": "current 4, target 0, so I move down", "action": "-"}',
           '{"thoughts": "current 2, target 5, so I move up", "action": "+"}',
           '{"thoughts": "current 3, target 1", "action": "-"}']


def perturb(policy, scale=0.05):
    """Move the policy adapter as an update would."""
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_" in name and ".policy." in name:
                p.add_(torch.randn_like(p) * scale)


def teacher_state(policy):
    return {k: v.clone() for k, v in policy.adapter_state("teacher").items()}


def rollout_of(policy, answers=ANSWERS):
    """A one-step Batch of len(answers) environments answered with `answers`, with the policy's own
    sampling-time log-probs (T = 1) and made-up rewards."""
    images = [np.random.default_rng(i).integers(0, 256, (300, 300, 3), dtype=np.uint8)
              for i in range(len(answers))]
    encoded = policy.encode(images, ["p"] * len(answers))
    responses = [policy.answer_ids(a) for a in answers]
    with torch.no_grad():
        scored = policy(encoded, responses, 1.0)

    def row(values):
        return torch.tensor([values], dtype=torch.float32)  # [T=1, N]

    zeros = row([0.0] * len(answers))
    return Batch(encoded=encoded, responses=responses,
                 token_logprobs=[lp[lp.shape[0] - len(r):]
                                 for lp, r in zip(scored["logprobs"], responses)],
                 old_logprobs=row(scored["seq_logprob"].tolist()), values=zeros, next_values=zeros,
                 rewards=row([1.0, -1.0, 0.5, -0.5][:len(answers)]), format_rewards=zeros,
                 terminated=zeros, truncated=zeros, format_valid=zeros + 1, actions=zeros,
                 entropy=zeros, thought_tokens=zeros)


def test_static_teacher_keeps_the_warm_start(make_policy):
    """--merge-every 0: the teacher stays pi_T^(0) however the policy moves; with 1 it follows."""
    torch.manual_seed(0)
    for merge_every in (0, 1):
        policy = make_policy()
        teacher = Teacher(policy, Args(merge_every=merge_every))
        teacher.start(policy)
        warm_start = teacher_state(policy)
        for update in (1, 2, 3):
            perturb(policy)
            teacher.merge(policy, update)
        unchanged = all(torch.equal(warm_start[k], v)
                        for k, v in policy.adapter_state("teacher").items())
        assert unchanged == (merge_every == 0)
        assert teacher.merges == 3 * merge_every


def merge_four_epoch_snapshots(policy, teacher, update):
    """Four perturbed snapshots of the policy adapter, merged into the teacher as one update's
    epochs; returns their mean."""
    snapshots = []
    for _ in range(4):
        perturb(policy)
        snapshots.append(policy.adapter_state("policy"))
    teacher.merge(policy, update, snapshots)
    return {k: sum(s[k] for s in snapshots) / 4 for k in snapshots[0]}


def test_epoch_snapshots_are_merged_with_the_reference_weights(make_policy):
    """--merge-snapshot epoch: one merge per update of the epoch snapshots, each at alpha/4, and the
    old teacher at 1 - alpha (EMA); the first merge holds the 4 snapshots alone, at 1/4 each. With
    the linear operator the teacher is that weighted mean exactly."""
    torch.manual_seed(0)
    policy = make_policy()
    teacher = Teacher(policy, Args(merge_snapshot="epoch", merge="linear", ema_alpha=0.5))
    teacher.start(policy)
    expected = None
    for update in (1, 2):
        mean = merge_four_epoch_snapshots(policy, teacher, update)
        expected = (mean if expected is None
                    else {k: 0.5 * mean[k] + 0.5 * expected[k] for k in mean})
        merged = policy.adapter_state("teacher")
        assert all(torch.allclose(merged[k], expected[k], atol=1e-6) for k in expected)
    assert teacher.merges == 2


def test_epoch_snapshots_with_sma_get_the_reference_counters_weights(make_policy):
    """--merge-snapshot epoch --merge-weights sma, as the reference's scripts run it: its counter
    counts loaded adapters (4 per update), so after update u each new snapshot weighs
    1 / (4(u + 1) + 4) and the old teacher 4(u + 1) / (4(u + 1) + 4): merge k >= 2 gives the
    snapshots 1 / (k + 1) in all (1/3, then 1/4), not the plain mean's 1 / k."""
    torch.manual_seed(0)
    policy = make_policy()
    teacher = Teacher(policy, Args(merge_snapshot="epoch", merge="linear", merge_weights="sma"))
    teacher.start(policy)
    expected = None
    for update in (1, 2, 3):
        mean = merge_four_epoch_snapshots(policy, teacher, update)
        loaded = 4 * update  # the reference's counter after loading this update's snapshots
        expected = (mean if expected is None else
                    {k: 4 / (loaded + 4) * mean[k] + loaded / (loaded + 4) * expected[k]
                     for k in mean})
        merged = policy.adapter_state("teacher")
        assert all(torch.allclose(merged[k], expected[k], atol=1e-6) for k in expected)


def test_ppo_update_keeps_a_snapshot_per_epoch(make_policy):
    """--merge-snapshot epoch: ppo_update keeps the policy adapter after every epoch (3 epochs of 2
    mini-batches: 3 snapshots, after 2, 4 and 6 steps); an early stop after the first step ends
    with one snapshot there."""
    torch.manual_seed(0)
    policy = make_policy()
    policy.eval()
    batch = rollout_of(policy)
    args = Args(guidance="none", temperature=1.0, ppo_epochs=3, minibatch_size=2,
                micro_batch_size=2, target_kl=0.0)
    start = policy.adapter_state("policy")
    snapshots = []
    optimizer = actor_critic_optimizer(policy, Args(lr=1e-3))
    logs = ppo_update(policy, optimizer, batch, None, args, snapshots)
    assert len(snapshots) == 3 and logs["optimizer_steps"] == 6
    assert torch.equal(snapshots[-1][next(iter(start))],
                       policy.adapter_state("policy")[next(iter(start))])
    moved = [not all(torch.equal(a[k], b[k]) for k in a)
             for a, b in zip([start] + snapshots, snapshots)]
    assert all(moved)  # each epoch's snapshot differs from the one before

    snapshots = []
    optimizer = actor_critic_optimizer(policy, Args(lr=1e-2))
    logs = ppo_update(policy, optimizer, rollout_of(policy), None,
                      Args(**vars(args) | {"target_kl": 1e-7}), snapshots)
    assert logs["optimizer_steps"] == 1 and len(snapshots) == 1


def test_thought_only_kl_ignores_the_action_tokens(make_policy):
    """--guide-tokens thought: the teacher's KL does not see the action tokens' log-probs; all: it
    does."""
    torch.manual_seed(0)
    policy = make_policy()
    policy.eval()
    batch = rollout_of(policy)
    # only the action tokens' log-probs change
    moved = [lp + 3.0 * thought_action_masks(policy.tokenizer, r.tolist(), envs.action_span)[1]
             for lp, r in zip(batch.token_logprobs, batch.responses)]
    teacher = Teacher(policy, Args())
    teacher.start(policy)
    for guide_tokens in ("thought", "all"):
        teacher.args = Args(guide_tokens=guide_tokens, micro_batch_size=2, temperature=1.0)
        kl = teacher.kl_penalties(policy, batch)
        batch_moved = Batch(**vars(batch) | {"token_logprobs": moved})
        kl_moved = teacher.kl_penalties(policy, batch_moved)
        assert torch.allclose(kl, torch.zeros(4), atol=1e-5)  # the teacher starts as the policy
        assert torch.allclose(kl_moved, kl) == (guide_tokens == "thought")


class ScriptedTeacher:
    """Stands in for the policy in Teacher.sft_targets: the teacher always answers `+`, with
    thoughts."""

    def add_teacher(self, path):
        pass

    def use_adapter(self, name):
        return contextlib.nullcontext()

    def generate(self, encoded, temperatures, max_new_tokens):
        return None, (['{"thoughts": "current 1, target 3, so I move up", "action": "+"}']
                      * len(encoded))

    def answer_ids(self, text):
        return text


def test_sft_targets_keep_the_teacher_action_only_when_guiding_every_token():
    """--guide-tokens thought: the teacher's thoughts with the agent's action ("-"); all: its
    whole answer."""
    game = envs.NumberLineEnv()
    batch = Batch(encoded=[None, None], responses=[], token_logprobs=[],
                  old_logprobs=torch.zeros(1, 2), values=None, next_values=None, rewards=None,
                  format_rewards=None, terminated=None, truncated=None,
                  format_valid=torch.ones(1, 2), actions=torch.tensor([[0.0, 1.0]]), entropy=None,
                  thought_tokens=None)
    for guide_tokens, expected in (("thought", ["-", "+"]), ("all", ["+", "+"])):
        teacher = Teacher(ScriptedTeacher(),
                          Args(guidance="sft", guide_tokens=guide_tokens, num_envs=2))
        targets, sampled, _ = teacher.sft_targets(ScriptedTeacher(), batch, game)
        assert sampled == 2  # the scripted teacher parses at its first try
        assert [json.loads(t)["action"] for t in targets] == expected
        assert all(json.loads(t)["thoughts"] == "current 1, target 3, so I move up"
                   for t in targets)


@pytest.mark.slow
def test_train_runs_the_ablations_end_to_end(tiny_dir, tmp_path):
    """--merge-snapshot epoch with 2 PPO epochs merges once per update (2 after 2 updates), with
    --guide-tokens all; --merge-every 0 merges none."""
    from test_train import run_train
    for flags, merges in ((["--merge-snapshot", "epoch", "--guide-tokens", "all",
                            "--target-kl", "0"], 2),
                          (["--merge-every", "0"], 0)):
        out = tmp_path / f"run{merges}"
        rows, _ = run_train(tiny_dir, out, "--guidance", "kl", "--ppo-epochs", "2", *flags)
        trainer = torch.load(os.path.join(out, "checkpoint", "trainer.pt"), weights_only=False)
        assert trainer["merges"] == merges
        assert all(np.isfinite(r["teacher_kl"]) for r in rows)
        assert (rows[-1]["time_merge"] > 0) == (merges > 0)
