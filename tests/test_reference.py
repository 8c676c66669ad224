"""Where the reference's code computes something the paper's text leaves open, the default is the
reference's and the alternative a flag (docs/ALGORITHM.md, "Where this code and the reference
part ways"): the KL of an answer that does not parse, the SFT target of one, the KL's
temperature, PPO2's value clip, and an SFT loss that does not depend on the micro-batch split."""
import functools
import json
from collections import defaultdict

import numpy as np
import pytest
import torch
from test_ablations import ANSWERS, ScriptedTeacher, perturb, rollout_of

import envs
from config import Args
from distill import kl_estimate
from ppo import accumulated_step, value_loss
from rollout import Batch
from teacher import Guidance, Teacher, replay_draws, replay_loss
from train import (
    actor_critic_optimizer,
    advantages_and_returns,
    micro_batch_loss,
    ppo_update,
)

TEACHER_ANSWER = '{"thoughts": "current 1, target 3, so I move up", "action": "+"}'


def test_an_answer_that_does_not_parse_gets_the_reference_kl(make_policy):
    """--unparsed-kl 100 (default): that step's KL_hat is 100, so its advantage drops by beta x 100;
    0: its tokens are scored like a parsed answer's (here ~0, the teacher starts as the policy)."""
    torch.manual_seed(0)
    policy = make_policy()
    policy.eval()
    batch = rollout_of(policy)
    batch.format_valid = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    teacher = Teacher(policy, Args())
    teacher.start(policy)
    for unparsed_kl, expected in ((100.0, 100.0), (0.0, 0.0)):
        teacher.args = Args(unparsed_kl=unparsed_kl, micro_batch_size=2, temperature=1.0)
        kl = teacher.kl_penalties(policy, batch)  # [4]
        assert abs(kl[1].item() - expected) < 1e-5
        assert torch.allclose(kl[[0, 2, 3]], torch.zeros(3), atol=1e-5)
    teacher.args = Args(micro_batch_size=2, temperature=1.0)
    guidance = Guidance(teacher_kl=teacher.kl_penalties(policy, batch).reshape(1, 4),
                        sft_targets=None, parse_rate=float("nan"), seconds=0.0)
    batch.rewards = torch.tensor([[0.0, 1.0, 0.0, 0.0]])  # the unparsed answer won the step
    with_kl, _, _ = advantages_and_returns(batch, guidance, Args(guidance="kl"))
    without, _, _ = advantages_and_returns(batch, None, Args(guidance="none"))
    assert without.argmax().item() == 1 and with_kl.argmin().item() == 1


def test_an_answer_that_does_not_parse_gets_no_sft_target_by_default():
    """--sft-unparsed none (default, the reference): no target and no teacher answer where the
    agent's answer did not parse; teacher: the teacher's answer with the action played."""
    game = envs.NumberLineEnv()
    batch = Batch(encoded=[None, None], responses=[], token_logprobs=[],
                  old_logprobs=torch.zeros(1, 2), values=None, next_values=None, rewards=None,
                  format_rewards=None, terminated=None, truncated=None,
                  format_valid=torch.tensor([[1.0, 0.0]]), actions=torch.tensor([[0.0, 1.0]]),
                  entropy=None, thought_tokens=None)
    for sft_unparsed, actions, observations in (("none", ["-", None], 1),
                                                ("teacher", ["-", "+"], 2)):
        args = Args(guidance="sft", sft_unparsed=sft_unparsed, num_envs=2)
        targets, _, asked = Teacher(ScriptedTeacher(), args).sft_targets(
            ScriptedTeacher(), batch, game)
        assert [t and json.loads(t)["action"] for t in targets] == actions
        assert asked == observations


def test_kl_is_scored_at_the_kl_temperature(make_policy):
    """--kl-temperature 1 (default, the reference): agent and teacher log-probs from raw logits,
    whatever the sampling temperature; -1: at the sampling temperature, the rollout's own."""
    torch.manual_seed(0)
    policy = make_policy()
    policy.eval()
    teacher = Teacher(policy, Args())
    teacher.start(policy)
    perturb(policy, 0.2)  # the policy moves away from its teacher
    batch = rollout_of(policy)
    sampling = 0.5
    with torch.no_grad():  # as the rollout scores its answers: at T = 1 too, in the same pass
        scored = policy(batch.encoded, batch.responses, sampling, extra_temperature=1.0)
    batch.token_logprobs = [lp[lp.shape[0] - len(r):]
                            for lp, r in zip(scored["logprobs"], batch.responses)]
    batch.kl_token_logprobs = [lp[lp.shape[0] - len(r):]
                               for lp, r in zip(scored["extra_logprobs"], batch.responses)]
    for kl_temperature, scored_at in ((1.0, 1.0), (-1.0, sampling)):
        teacher.args = Args(kl_temperature=kl_temperature, temperature=sampling, micro_batch_size=4)
        kl = teacher.kl_penalties(policy, batch)
        with torch.no_grad():
            agent = policy(batch.encoded, batch.responses, scored_at)
            with policy.use_adapter("teacher"):
                reference = policy(batch.encoded, batch.responses, scored_at)
        mask = agent["response_mask"] & agent["thought_mask"]
        expected = kl_estimate(agent["logprobs"], reference["logprobs"], mask)
        assert kl.min() > 0.01  # the two adapters differ
        assert torch.allclose(kl, expected, atol=1e-4)


def test_value_clip_keeps_the_value_near_its_rollout_value():
    """PPO2's clipped value loss (--value-clip): the pessimistic max of the plain error and the
    error of V clipped to old +- clip, here by hand."""
    values, old, returns = (torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]),
                            torch.tensor([0.0, 0.5]))
    # sample 0: plain (1-0)^2 = 1, clipped (0.1-0)^2 = 0.01 -> 1; sample 1: plain 0.25, clipped 0.25
    assert abs(value_loss(values, returns, old, clip=0.1).item() - 0.5 * (1.0 + 0.25) / 2) < 1e-6
    values = torch.tensor([0.3, 0.0])  # sample 0: plain 0.09, clipped (0.1)^2 = 0.01 -> 0.09
    returns = torch.tensor([1.0, 0.0])  # sample 0: plain 0.49, clipped 0.81 -> the clipped one
    assert abs(value_loss(values, returns, old, clip=0.1).item() - 0.5 * 0.81 / 2) < 1e-6
    assert abs(value_loss(values, returns).item() - 0.5 * (0.49 + 0.0) / 2) < 1e-6


def test_train_clips_the_value_around_the_rollout_values(make_policy):
    """micro_batch_loss anchors the value clip at the values of the rollout (batch.values)."""
    torch.manual_seed(0)
    policy = make_policy()
    policy.eval()
    batch = rollout_of(policy)
    batch.values = torch.full((1, 4), 5.0)  # far from the head's outputs: the clipped error rules
    advantages, returns = torch.zeros(4), torch.zeros(4)
    for value_clip in (0.0, 0.1):
        logs = defaultdict(list)
        args = Args(temperature=1.0, value_clip=value_clip)
        with torch.no_grad():
            micro_batch_loss(policy, batch, advantages, returns, batch.old_logprobs.flatten(),
                             batch.values.flatten(), None, 0.0, args, logs, [0, 1, 2, 3])
            values = policy(batch.encoded, batch.responses, 1.0)["value"]
        expected = value_loss(values, returns, torch.full((4,), 5.0), clip=value_clip or None)
        assert abs(logs["value_loss"][0] - expected.item()) < 1e-4
    assert expected.item() > 0.5 * 4.8 ** 2  # clipped: V can only count as 5 +- 0.1


def test_sft_loss_does_not_depend_on_the_micro_batch_split(make_policy):
    """The same mini-batch of 4 samples with SFT targets of different lengths gives the same
    gradient as one micro-batch of 4 or two of 2: the SFT term is normalised over the mini-batch's
    guided tokens, not averaged per micro-batch."""
    torch.manual_seed(0)
    policy = make_policy()
    policy.eval()
    batch = rollout_of(policy)
    targets = [policy.answer_ids(a) for a in (TEACHER_ANSWER, ANSWERS[3], ANSWERS[1],
                                               '{"thoughts": "up", "action": "+"}')]
    teacher = Teacher(policy, Args(guidance="sft"))
    tokens = [teacher.guided_tokens(policy, t) for t in targets]
    assert len(set(tokens)) > 2
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.0)
    args = Args(guidance="sft", temperature=1.0)
    gradients = []
    for micro_batch_size in (4, 2, 1):
        loss_of = functools.partial(micro_batch_loss, policy, batch, torch.zeros(4), torch.zeros(4),
                                    batch.old_logprobs.flatten(), batch.values.flatten(), targets,
                                    sum(tokens) / 4, args, defaultdict(list))
        accumulated_step(loss_of, [0, 1, 2, 3], micro_batch_size, optimizer, [(trainable, 1e9)])
        gradients.append(torch.cat([p.grad.flatten() for p in trainable]))
    assert gradients[0].norm() > 0
    assert torch.allclose(gradients[0], gradients[1], rtol=1e-4, atol=1e-7)
    assert torch.allclose(gradients[0], gradients[2], rtol=1e-4, atol=1e-7)


def test_sft_replay_imitates_the_drawn_targets_with_the_reference_loss(make_policy):
    """--sft-batch replay: each buffer entry is drawn once before any is drawn twice, and three
    drawn pairs (one without a target) in a mini-batch of 4 give the gradient of the two targets'
    thought-token means at T = 1, summed and divided by 4, each target scored alone."""
    torch.manual_seed(0)
    policy = make_policy()
    perturb(policy, 0.05)
    policy.eval()
    batch = rollout_of(policy)
    targets = [policy.answer_ids(TEACHER_ANSWER), None, policy.answer_ids(ANSWERS[1]), None]
    frames = [np.random.default_rng(i).integers(0, 256, (300, 300, 3), dtype=np.uint8)
              for i in range(4)]
    prompts = [f"prompt {i}" for i in range(4)]
    batch.encoded = policy.encode(frames, prompts)
    replay = [((frame, prompt), target) if target is not None else (None, None)
              for frame, prompt, target in zip(frames, prompts, targets)]
    draws = replay_draws(len(replay))
    drawn = [next(draws) for _ in range(8)]
    assert sorted(drawn[:4]) == sorted(drawn[4:]) == [0, 1, 2, 3]
    trainable = [p for p in policy.parameters() if p.requires_grad]
    logs = defaultdict(list)
    replay_loss(policy, replay[:3], 4, Args(guidance="sft", temperature=0.5), logs)
    gradient = torch.cat([p.grad.flatten() for p in trainable if p.grad is not None])
    policy.zero_grad(set_to_none=True)
    expected = 0.0
    for i in (0, 2):
        out = policy([batch.encoded[i]], [targets[i]], 1.0, value=False)
        thought = out["thought_mask"]
        expected = expected - (out["logprobs"] * thought).sum() / thought.sum() / 4
    expected.backward()
    reference = torch.cat([p.grad.flatten() for p in trainable if p.grad is not None])
    assert gradient.norm() > 0
    assert torch.allclose(gradient, reference, rtol=1e-4, atol=1e-7)
    assert logs["sft_loss"][0] == pytest.approx(2 * expected.item(), rel=1e-4)


def test_bfloat16_old_logprobs_are_recomputed_in_the_first_epochs_micro_batches(make_policy):
    """In bfloat16 the rollout's log-probs (one batch of 8) and PPO's (micro-batches of 2, other
    padding) differ by rounding, here by more than 0.001; recomputed in the first epoch's own
    micro-batches, every ratio before the first step is exactly 1."""
    torch.manual_seed(0)
    policy = make_policy(dtype=torch.bfloat16)
    perturb(policy, 0.05)
    policy.eval()
    batch = rollout_of(policy, ANSWERS + ANSWERS)
    batch.rewards = torch.tensor([[1.0, -1.0, 0.5, -0.5] * 2])
    batch.encoded = policy.encode(
        [np.random.default_rng(i).integers(0, 256, (300, 300, 3), dtype=np.uint8)
         for i in range(8)], ["p" * (i + 1) for i in range(8)])  # 8 paddings
    batch.responses, _ = policy.generate(batch.encoded, 0.2, 48)
    with torch.no_grad():  # the rollout's scoring: one batch, at the sampling temperature
        batch.old_logprobs = (policy(batch.encoded, batch.responses, 0.2)["seq_logprob"]
                              .float()[None])
        in_pairs = torch.cat([policy(batch.encoded[i:i + 2], batch.responses[i:i + 2],
                                     0.2)["seq_logprob"]
                              for i in range(0, 8, 2)]).float()
    assert (in_pairs - batch.old_logprobs[0]).abs().max() > 1e-3
    args = Args(guidance="none", temperature=0.2, ppo_epochs=1, minibatch_size=8,
                micro_batch_size=2, target_kl=0.0, lr=1e-9, critic_lr=1e-9)
    logs = ppo_update(policy, actor_critic_optimizer(policy, args), batch, None, args)
    assert logs["first_log_ratio_max"] == 0.0
