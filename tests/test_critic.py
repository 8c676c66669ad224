"""The critic's three designs (--critic shared|detached|adapter), its own parameter group, its
normalised targets and its warm-up: what each promises about gradients, log-probs and
checkpoints (docs/ALGORITHM.md §3, "The critic")."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_ablations import rollout_of
from test_train import ROOT

import envs
from config import Args
from plumbing.loader import load_policy
from plumbing.tinyvlm import tiny_model
from ppo import batch_moments
from train import actor_critic_optimizer


@pytest.fixture(scope="module")
def critics(tiny_dir):
    """One tiny policy per --critic choice, the same weights in each."""
    made = {}
    for critic in ("shared", "detached", "adapter"):
        torch.manual_seed(0)
        made[critic] = load_policy(tiny_model(tiny_dir), envs.action_span, lora_r=8, lora_alpha=16,
                                   lora_dropout=0.0, critic=critic,
                                   answer_opening=envs.ANSWER_OPENING)
        made[critic].eval()
    return made


def test_the_critic_choice_leaves_the_random_state_alone(make_policy):
    """The critic's adapter draws its init aside: after building the policy the global random
    state is the one the shared critic leaves, so a seed's warm start is the same whatever the
    critic (and the policy adapter and value head start the same)."""
    draws, weights = {}, {}
    for critic in ("shared", "adapter"):
        torch.manual_seed(0)
        policy = make_policy(critic=critic)
        draws[critic] = torch.rand(4)
        weights[critic] = [p.detach().clone() for p in policy.adapter_parameters("policy").values()]
        weights[critic] += [p.detach().clone() for p in policy.value_head.parameters()]
    assert torch.equal(draws["shared"], draws["adapter"])
    assert all(torch.equal(a, b) for a, b in zip(weights["shared"], weights["adapter"]))


def gradient_norm(loss, params):
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return sum(float(g.abs().sum()) for g in grads if g is not None)


@pytest.mark.parametrize("critic", ["shared", "detached", "adapter"])
def test_what_the_value_loss_and_the_policy_loss_reach(critics, critic):
    """detached and adapter: the value loss's gradient on the policy adapter is exactly zero, and
    the policy loss's on the critic's weights too; shared: the value loss moves the policy
    adapter."""
    policy = critics[critic]
    # the critic adapter starts as the policy (train.py), then moves on its own
    with torch.no_grad():
        for p in policy.adapter_parameters("critic").values():
            p.add_(0.01 * torch.randn_like(p))
    batch = rollout_of(policy)
    out = policy(batch.encoded, batch.responses, 1.0)
    value_loss = out["value"].pow(2).sum()
    policy_loss = out["seq_logprob"].sum()
    actor = list(policy.adapter_parameters("policy").values())
    critic_params = policy.critic_parameters()
    assert gradient_norm(policy_loss, critic_params) == 0.0
    assert gradient_norm(value_loss, policy.value_head.parameters()) > 0.0
    if critic == "shared":
        assert gradient_norm(value_loss, actor) > 0.0
    else:
        assert gradient_norm(value_loss, actor) == 0.0
    if critic == "adapter":
        assert gradient_norm(value_loss, list(policy.adapter_parameters("critic").values())) > 0.0
        assert len(critic_params) > len(list(policy.value_head.parameters()))


def test_log_probs_do_not_depend_on_the_critic(critics):
    """The actor's outputs are the same whatever the critic reads."""
    outputs = []
    for policy in critics.values():
        with torch.no_grad():
            batch = rollout_of(policy)
            outputs.append(policy(batch.encoded, batch.responses, 0.5))
    for out in outputs[1:]:
        for key in ("logprobs", "seq_logprob", "opening_logprob"):
            assert torch.equal(out[key], outputs[0][key])


def test_the_critic_has_its_own_parameter_group(critics):
    """Actor and critic: disjoint groups, each with its learning rate and gradient clip."""
    policy = critics["adapter"]
    optimizer = actor_critic_optimizer(policy, Args(lr=3e-5, critic_lr=1e-3,
                                                    critic_max_grad_norm=1.0))
    actor, critic = optimizer.param_groups
    assert ((actor["lr"], actor["max_grad_norm"], critic["lr"], critic["max_grad_norm"])
            == (3e-5, 0.01, 1e-3, 1.0))
    critic_ids = {id(p) for p in critic["params"]}
    assert not critic_ids & {id(p) for p in actor["params"]}
    assert critic_ids == {id(p) for p in policy.critic_parameters()}
    trained = {id(p) for p in policy.parameters() if p.requires_grad}
    assert trained == critic_ids | {id(p) for p in actor["params"]}


def test_running_return_statistics_equal_those_of_all_returns(critics):
    """--value-norm: merging batches' statistics gives the mean and variance of all of them, and
    the head's output is denormalised by them."""
    policy = critics["detached"]
    rng = np.random.default_rng(0)
    batches = [torch.tensor(rng.normal(3.0, 4.0, n)) for n in (64, 32, 128)]
    for returns in batches:
        policy.value_head.update(*batch_moments(returns))
    everything = torch.cat(batches)
    head = policy.value_head
    assert head.return_mean.item() == pytest.approx(everything.mean().item(), rel=1e-5)
    assert head.return_var.item() == pytest.approx(everything.var(unbiased=False).item(), rel=1e-5)
    values = torch.tensor([-2.0, 0.0, 7.0])
    assert torch.allclose(head.denormalize(head.normalize(values)), values, atol=1e-5)


def test_checkpoint_carries_the_critic(critics, tmp_path):
    """The critic adapter and the head with its return statistics are saved and loaded back."""
    policy = critics["adapter"]
    with torch.no_grad():
        for p in policy.critic_parameters():
            p.add_(torch.randn_like(p))
    policy.value_head.update(torch.tensor(5.0), torch.tensor(9.0), torch.tensor(10.0))
    policy.save(tmp_path / "adapters", adapters=["policy", "critic"])
    loaded = load_policy(policy.model.get_base_model().name_or_path, envs.action_span, lora_r=8,
                         lora_alpha=16, adapter_path=str(tmp_path / "adapters" / "policy"),
                         critic="adapter")
    saved, restored = policy.adapter_state("critic"), loaded.adapter_state("critic")
    assert (saved.keys() == restored.keys()
            and all(torch.equal(saved[k], restored[k]) for k in saved))
    for key, tensor in policy.value_head.state_dict().items():
        assert torch.equal(tensor, loaded.value_head.state_dict()[key]), key


def train(tiny_dir, out, *flags):
    """train.py with tiny sizes (test_train.run_train's), any number of updates."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--out", str(out), "--num-envs", "4",
           "--steps-per-update", "8", "--max-new-tokens", "24", "--lora-r", "8",
           "--lora-alpha", "16", "--ppo-epochs", "1", "--minibatch-size", "8",
           "--micro-batch-size", "4", "--eval-episodes", "0", "--warmup-sft-steps", "0", *flags]
    result = subprocess.run(cmd, cwd=os.path.dirname(tiny_dir), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.mark.slow
def test_train_warms_the_critic_up_and_resumes_it(tiny_dir, tmp_path):
    """--critic adapter end to end: with --critic-warmup 2 the policy adapter stays as it was
    initialised while the critic adapter learns, and Adam keeps no moments of the actor; the
    checkpoint holds the critic adapter, and --resume continues with the actor learning from the
    start of its own cosine schedule (--lr at its first update)."""
    from peft.utils import load_peft_weights
    out = tmp_path / "run"
    flags = ["--guidance", "kl", "--critic", "adapter", "--critic-warmup", "2",
             "--critic-lr", "1e-3", "--value-norm", "--seed", "3"]
    rows = train(tiny_dir, out, *flags, "--updates", "2")
    assert [r["lr"] for r in rows] == [0.0, 0.0]
    adapters = out / "checkpoint" / "adapters"
    torch.manual_seed(3)  # train.py's seed before it builds the policy: the same initial adapter
    initial = load_policy(tiny_model(tiny_dir), envs.action_span, lora_r=8, lora_alpha=16,
                          critic="adapter").adapter_state("policy")
    saved = load_peft_weights(str(adapters / "policy"))
    assert all(torch.equal(initial[k], saved[k]) for k in initial)
    critic = load_peft_weights(str(adapters / "critic"))
    assert any(not torch.equal(saved[k], critic[k]) for k in saved)
    trainer = torch.load(out / "checkpoint" / "trainer.pt", weights_only=True)
    groups = trainer["optimizer"]["param_groups"]
    assert groups[1]["params"] and all(i in trainer["optimizer"]["state"]
                                       for i in groups[1]["params"])
    assert not any(i in trainer["optimizer"]["state"] for i in groups[0]["params"])
    rows = train(tiny_dir, out, *flags, "--updates", "3", "--resume")
    assert [r["update"] for r in rows] == [1, 2, 3]
    assert rows[-1]["lr"] == pytest.approx(Args().lr)
    assert all(np.isfinite(r["grad_norm_critic"]) and 0.0 <= r["opening_prob"] <= 1.0 for r in rows)


def test_normalised_returns_stay_finite_when_all_returns_are_equal(critics):
    """A batch whose returns are all equal has variance 0: the normalisation's floor keeps the
    value loss finite, so the step is not skipped."""
    head = critics["adapter"].value_head
    state = {k: v.clone() for k, v in head.state_dict().items()}
    try:
        head.return_var.zero_()
        head.return_count.fill_(64)
        assert torch.isfinite(head.normalize(torch.tensor([1.0, 1.5]))).all()
    finally:
        head.load_state_dict(state)
