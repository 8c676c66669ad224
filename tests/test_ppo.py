import math
import os

import pytest
import torch

from ppo import (
    cosine_lr,
    gae,
    normalize_advantages,
    per_token_entropy,
    policy_loss,
    sequence_logprob,
    token_logprobs,
    value_loss,
)


def test_gae_hand_computed_termination_truncation_and_open_end():
    # One env, 5 steps: terminated at t=1, truncated at t=2, rollout cut off after t=4.
    rewards = torch.tensor([[1.0], [0.0], [2.0], [0.0], [1.0]])
    values = torch.tensor([[0.5], [1.0], [0.2], [0.4], [0.6]])
    # t=1 is terminal: its next value (9.0) must be ignored. t=2 is truncated: 2.0 is the
    # value of its final observation (not values[3]). t=4: value after the rollout.
    next_values = torch.tensor([[1.0], [9.0], [2.0], [0.6], [0.8]])
    terminated = torch.tensor([[False], [True], [False], [False], [False]])
    truncated = torch.tensor([[False], [False], [True], [False], [False]])
    adv, ret = gae(rewards, values, next_values, terminated, truncated, gamma=0.5, lam=0.5)
    # deltas: 1+0.5*1-0.5=1.0 | 0-1.0=-1.0 | 2+0.5*2-0.2=2.8 | 0.5*0.6-0.4=-0.1 | 1+0.5*0.8-0.6=0.8
    # A4=0.8, A3=-0.1+0.25*0.8=0.1, A2=2.8 (ends), A1=-1.0 (ends), A0=1.0+0.25*(-1.0)=0.75
    expected = torch.tensor([[0.75], [-1.0], [2.8], [0.1], [0.8]])
    assert adv.dtype == torch.float32 and ret.dtype == torch.float32
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, expected + values)


def test_gae_bootstrap_only_for_truncation_and_envs_independent():
    T, N = 4, 3
    g = torch.Generator().manual_seed(0)
    rewards, values, next_values = (torch.randn(T, N, generator=g) for _ in range(3))
    terminated = torch.zeros(T, N, dtype=torch.bool)
    truncated = torch.zeros(T, N, dtype=torch.bool)
    terminated[1, 0] = True
    truncated[1, 1] = True
    adv, _ = gae(rewards, values, next_values, terminated, truncated)
    changed = next_values.clone()
    changed[1] += 5.0
    adv2, _ = gae(rewards, values, changed, terminated, truncated)
    assert torch.allclose(adv[:, 0], adv2[:, 0])  # terminated: no bootstrap
    assert torch.allclose(adv2[1, 1] - adv[1, 1], torch.tensor(0.9 * 5.0))  # truncated: gamma*dV
    assert not torch.allclose(adv[0, 1], adv2[0, 1])  # same episode: propagates back
    # A change after the episode boundary at t=1 must not reach steps 0..1 of that episode.
    later = next_values.clone()
    later[2] += 5.0
    adv3, _ = gae(rewards, values, later, terminated, truncated)
    assert torch.allclose(adv[:2, :2], adv3[:2, :2])
    assert not torch.allclose(adv[:2, 2], adv3[:2, 2])  # env 2 never ended: propagates


def test_normalize_advantages():
    a = normalize_advantages(torch.tensor([1.0, 2.0, 3.0, 10.0]))
    assert abs(a.mean().item()) < 1e-6 and abs(a.std().item() - 1.0) < 1e-5


# Each process's advantages: different sizes and scales, so statistics per process would differ.
RANK_ADVANTAGES = [torch.tensor([3.0, 4.5, 2.0, 5.0, 3.5]),
                   torch.tensor([-1.0, 0.5, -2.0, 0.0, -0.5, 1.0, -1.5])]  # [5], [7]


def _normalize_on_rank(rank, port, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.save(normalize_advantages(RANK_ADVANTAGES[rank]), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_normalize_advantages_over_all_processes(tmp_path):
    """Under torch.distributed each process normalises its share with the statistics of every
    process's samples: the same numbers as normalising the concatenated batch in one process."""
    import socket
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_normalize_on_rank, args=(port, str(tmp_path)), nprocs=2)
    whole = normalize_advantages(torch.cat(RANK_ADVANTAGES))  # [12], one process
    ends = [0, len(RANK_ADVANTAGES[0]), len(whole)]
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.allclose(got, whole[ends[rank]:ends[rank + 1]], atol=1e-6), rank


def test_zero_advantages_give_zero_gradient():
    lp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    loss, _ = policy_loss(lp, torch.tensor([-1.2, -1.9, -0.5]), torch.zeros(3))
    loss.backward()
    assert torch.equal(lp.grad, torch.zeros(3))


def test_ratio_one_before_update():
    lp = torch.tensor([-3.0, -1.0, -2.0])
    adv = torch.tensor([1.0, -2.0, 0.5])
    loss, stats = policy_loss(lp, lp.clone(), adv)
    assert loss.item() == pytest.approx(-adv.mean().item())
    assert stats["approx_kl"].item() == 0.0 and stats["clip_fraction"].item() == 0.0
    assert stats["ratio_max"].item() == 1.0 and stats["guard_fraction"].item() == 0.0


def test_clipping_stops_gradient_past_clip_range():
    old = torch.zeros(2)
    adv = torch.ones(2)
    lp = torch.tensor([math.log(1.5), math.log(0.5)], requires_grad=True)
    loss, stats = policy_loss(lp, old, adv, clip=0.1)
    loss.backward()
    assert lp.grad[0].item() == 0.0  # r = 1.5 > 1.1 with A > 0: clipped, no push further
    assert lp.grad[1].item() < 0.0  # r = 0.5 with A > 0: min picks r*A, still pushed up
    assert stats["clip_fraction"].item() == 1.0
    assert loss.item() == pytest.approx(-(1.1 + 0.5) / 2)
    assert stats["approx_kl"].item() > 0.0


def test_ratio_guard_acts_per_sample():
    """A sample whose ratio exceeds the guard uses only the clipped term (and drops out of the
    gradient); the other samples keep the plain min(), whatever else is in the batch."""
    old = torch.zeros(2)
    adv = torch.tensor([-1.0, 2.0])
    lp = torch.tensor([math.log(20.0), math.log(0.5)], requires_grad=True)
    loss, stats = policy_loss(lp, old, adv)
    # guarded sample: clipped 1.1 * -1; the other: min(0.5 * 2, 0.9 * 2) = 1.0 (a per-batch guard
    # gave 1.8)
    assert loss.item() == pytest.approx(-(1.1 * -1.0 + 1.0) / 2)
    loss.backward()
    assert lp.grad[0].item() == 0.0 and lp.grad[1].item() < 0.0
    assert stats["guard_fraction"].item() == 0.5
    assert stats["ratio_max"].item() == pytest.approx(20.0)
    assert stats["log_ratio_max"].item() == pytest.approx(math.log(20.0))
    loss, stats = policy_loss(torch.tensor([math.log(5.0), 0.0]), old, adv)
    assert stats["guard_fraction"].item() == 0.0
    assert loss.item() == pytest.approx(-(5.0 * -1.0 + 2.0) / 2)


def test_ratio_guard_does_not_depend_on_micro_batching():
    """The mean of two halves' losses is the whole batch's loss (a per-micro-batch guard broke
    this)."""
    old = torch.zeros(4)
    adv = torch.tensor([-1.0, 2.0, 0.5, -0.3])
    lp = torch.tensor([math.log(20.0), math.log(0.5), 0.3, -0.2])
    whole, _ = policy_loss(lp, old, adv)
    halves = [policy_loss(lp[i:i + 2], old[i:i + 2], adv[i:i + 2])[0] for i in (0, 2)]
    assert whole.item() == pytest.approx(sum(h.item() for h in halves) / 2)


def test_huge_log_ratio_gives_finite_gradient():
    """exp(100) overflows float32; the clamped log-ratio keeps loss and gradient finite."""
    lp = torch.tensor([100.0, -100.0, 0.0], requires_grad=True)
    loss, stats = policy_loss(lp, torch.zeros(3), torch.tensor([-1.0, 1.0, 1.0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
    assert stats["log_ratio_max"].item() == pytest.approx(100.0)


def test_value_loss_plain_and_clipped():
    v = torch.tensor([1.0, 3.0])
    r = torch.tensor([0.0, 0.0])
    assert value_loss(v, r).item() == pytest.approx(0.5 * (1 + 9) / 2)
    old = torch.tensor([0.0, 2.0])
    # clipped V: [0.2, 2.2] -> squared errors [0.04, 4.84]; max with plain [1, 9] -> [1, 9]
    assert value_loss(v, r, old, clip=0.2).item() == pytest.approx(2.5)
    # V moved towards R past the clip: pessimistic max keeps the clipped (larger) error
    v2 = torch.tensor([0.0])
    assert value_loss(v2, torch.tensor([0.0]), torch.tensor([1.0]), clip=0.2).item() \
        == pytest.approx(0.5 * 0.8**2)


def test_cosine_lr_endpoints_and_monotonic():
    lrs = [cosine_lr(u, 25, 1e-5) for u in range(30)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[25] == pytest.approx(1e-9)
    assert lrs[29] == pytest.approx(1e-9)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert cosine_lr(5, 10, 1.0, 0.0) == pytest.approx(0.5)


def test_token_logprobs_float64_reference_and_temperature():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g) * 4
    tokens = torch.randint(0, 11, (2, 5), generator=g)
    ref = torch.log_softmax(logits.double() / 0.2, -1).gather(-1, tokens[..., None])[..., 0]
    out = token_logprobs(logits, tokens, temperature=0.2)
    assert out.dtype == torch.float32 and out.shape == (2, 5)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    scaled = token_logprobs(logits / 0.2, tokens)
    torch.testing.assert_close(token_logprobs(logits, tokens, 0.2), scaled)
    assert token_logprobs(logits.bfloat16(), tokens).dtype == torch.float32


def test_sequence_logprob_weights_thought_by_lambda():
    lp = torch.tensor([[-1.0, -2.0, -0.5, -0.25, float("-inf")]])  # last position: padding
    thought = torch.tensor([[1, 1, 0, 0, 0]])
    action = torch.tensor([[0, 0, 1, 1, 0]])
    out = sequence_logprob(lp, thought, action, thought_coef=0.5)
    assert out.shape == (1,)
    assert out.item() == pytest.approx(0.5 * -3.0 + -0.75)


def test_entropy_of_uniform_logits_is_log_v():
    ent = per_token_entropy(torch.zeros(3, 4, 7, dtype=torch.bfloat16))
    assert ent.dtype == torch.float32 and ent.shape == (3, 4)
    torch.testing.assert_close(ent, torch.full((3, 4), math.log(7)))
    assert per_token_entropy(torch.tensor([0.0, -1e4, -1e4])).item() == pytest.approx(0.0, abs=1e-6)


def test_non_finite_gradient_step_is_skipped_and_weights_are_kept():
    """A NaN gradient never reaches the weights: the step is skipped and reported."""
    from ppo import accumulated_step
    w = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.Adam([w], lr=0.1)

    def loss(idx):
        return (w[idx] * torch.tensor([float("nan"), 1.0, 1.0])[idx]).sum()

    (norm,), stepped = accumulated_step(loss, [0, 1, 2], 2, optimizer, [([w], 1.0)])
    assert not stepped and not math.isfinite(norm)
    assert torch.equal(w.detach(), torch.ones(3)) and w.grad is None
    (norm,), stepped = accumulated_step(lambda idx: (w[idx] ** 2).sum(), [0, 1, 2], 2, optimizer,
                                        [([w], 1.0)])
    assert stepped and math.isfinite(norm) and (w.detach() < 1.0).all()


def test_accumulated_gradient_equals_the_whole_mini_batch():
    """Micro-batches weighted by size give the gradient of the mini-batch's mean loss."""
    from ppo import accumulated_step
    x = torch.randn(5, 3)
    grads = []
    for micro in (5, 2):
        w = torch.nn.Parameter(torch.ones(3))
        optimizer = torch.optim.SGD([w], lr=0.0)
        accumulated_step(lambda idx: (x[idx] @ w).pow(2).mean(), list(range(5)), micro, optimizer,
                         [([w], 1e9)])
        grads.append(w.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_each_group_is_clipped_on_its_own():
    """The actor's and the critic's gradients are clipped to their own bounds: a large critic
    gradient does not shrink the actor's step."""
    from ppo import accumulated_step
    actor, critic = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([actor, critic], lr=1.0)

    def loss(idx):
        return actor.sum() * 0.003 + critic.sum() * 100.0  # grad norms 0.0042 and 141

    norms, stepped = accumulated_step(loss, [0], 1, optimizer, [([actor], 0.01), ([critic], 1.0)])
    assert (stepped and norms[0] == pytest.approx(0.003 * 2 ** 0.5)
            and norms[1] == pytest.approx(100 * 2 ** 0.5))
    assert torch.allclose(actor.detach(), torch.full((2,), -0.003))  # unclipped: under 0.01
    assert torch.allclose(critic.detach(), torch.full((2,), -(0.5 ** 0.5)))  # clipped to norm 1


def test_accumulation_averages_over_processes_once_per_step():
    """With a DDP module, every micro-batch's backward but the last runs under no_sync, so the
    gradients are all-reduced once per optimizer step, not once per micro-batch."""
    import contextlib

    from ppo import accumulated_step

    class CountingModule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.unsynced = torch.nn.Parameter(torch.ones(7)), 0

        @contextlib.contextmanager
        def no_sync(self):
            self.unsynced += 1
            yield

    module = CountingModule()
    optimizer = torch.optim.SGD([module.w], lr=0.1)
    accumulated_step(lambda idx: module.w[idx].sum(), list(range(7)), 2, optimizer,
                     [([module.w], 1.0)], model=module)
    assert module.unsynced == 3  # micro-batches [0,1] [2,3] [4,5] accumulate; [6] synchronises
    accumulated_step(lambda idx: module.w[idx].sum(), list(range(2)), 2, optimizer,
                     [([module.w], 1.0)], model=module)
    assert module.unsynced == 3  # a single micro-batch always synchronises
