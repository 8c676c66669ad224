import pytest
import torch

from distill import (
    kl_estimate,
    kl_penalized_advantages,
    replay_sft_loss,
    retry_temperatures,
    sft_loss,
)
from ppo import masked_mean

# Policy p and teacher q over 4 tokens; q/p <= 2.5, so the forward estimator's clamp at 10
# never engages and its estimate is unbiased here.
P = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
Q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)


def sampled_logprobs(n=200_000, seed=0):
    """Tokens sampled from the policy p, scored by p and q: [1, n] each."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.multinomial(P.float(), n, replacement=True, generator=g)
    return P.log()[tokens].float()[None], Q.log()[tokens].float()[None]


def test_reverse_kl_estimators_approach_true_kl():
    lp, lt = sampled_logprobs()
    mask = torch.ones_like(lp)
    kl_pq = (P * (P / Q).log()).sum().item()
    assert kl_estimate(lp, lt, mask, "k3").item() == pytest.approx(kl_pq, abs=5e-3)
    assert masked_mean(lp - lt, mask).item() == pytest.approx(kl_pq, abs=5e-3)


def test_forward_estimator_approaches_forward_kl():
    lp, lt = sampled_logprobs()
    kl_qp = (Q * (Q / P).log()).sum().item()
    forward = kl_estimate(lp, lt, torch.ones_like(lp), "forward").item()
    assert forward == pytest.approx(kl_qp, abs=1e-2)


def test_clip_and_abs_bounds():
    g = torch.Generator().manual_seed(1)
    lp, lt = torch.randn(8, 16, generator=g) * 20, torch.randn(8, 16, generator=g) * 20
    mask = torch.ones(8, 16)
    per_token_clip = kl_estimate(lp[:, :1], lt[:, :1], mask[:, :1], "clip", max_value=10.0)
    assert (per_token_clip >= 0).all() and (per_token_clip <= 10.0).all()
    assert per_token_clip.max().item() == 10.0  # 20-sigma log-ratios do hit the cap
    clip = kl_estimate(lp, lt, mask)  # default estimator is "clip"
    assert clip.shape == (8,) and (clip >= 0).all() and (clip <= 10.0).all()
    assert (kl_estimate(lp, lt, mask, "abs") >= 0).all()
    assert (kl_estimate(lp, lt, mask, "k3") >= 0).all()
    # clip only counts tokens the policy likes more than the teacher
    below_teacher = kl_estimate(torch.tensor([[-3.0]]), torch.tensor([[-1.0]]), torch.ones(1, 1))
    assert below_teacher.item() == 0.0


@pytest.mark.parametrize("estimator", ["clip", "abs", "k3", "forward"])
def test_masked_positions_ignored_and_empty_mask_is_zero(estimator):
    g = torch.Generator().manual_seed(2)
    lp, lt = -torch.rand(3, 6, generator=g) * 3, -torch.rand(3, 6, generator=g) * 3
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    out = kl_estimate(lp, lt, mask, estimator)
    lp2, lt2 = lp.clone(), lt.clone()
    lp2[mask == 0] = -50.0
    lt2[mask == 0] = float("-inf")
    out2 = kl_estimate(lp2, lt2, mask, estimator)
    torch.testing.assert_close(out, out2)
    assert out[2].item() == 0.0 and torch.isfinite(out2).all()


def test_unknown_estimator_names_valid_ones():
    with pytest.raises(ValueError, match="clip.*abs.*k3.*forward"):
        kl_estimate(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), "bogus")


def test_masked_mean_empty_is_zero():
    out = masked_mean(torch.ones(2, 3), torch.zeros(2, 3))
    assert torch.equal(out, torch.zeros(2))


def test_kl_penalized_advantages_and_no_gradient_through_kl():
    kl = torch.tensor([0.5, 0.0, 2.0], requires_grad=True)
    out = kl_penalized_advantages(torch.tensor([1.0, -1.0, 0.0]), kl, beta=0.5)
    torch.testing.assert_close(out, torch.tensor([0.75, -1.0, -1.0]))
    assert not out.requires_grad


def test_sft_loss_hand_computed_and_ignores_action_tokens():
    lp = torch.tensor([[-1.0, -2.0, -5.0, 0.0], [-0.5, -7.0, 0.0, 0.0]], requires_grad=True)
    thought = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])  # [0,2] and [1,1] are action tokens
    loss = sft_loss(lp, thought)
    assert loss.item() == pytest.approx((1.0 + 2.0 + 0.5) / 3)
    loss.backward()
    expected_grad = -thought.float() / 3
    torch.testing.assert_close(lp.grad, expected_grad)
    lp2 = lp.detach().clone()
    lp2[0, 2], lp2[1, 1] = -100.0, float("-inf")
    lp2.requires_grad_(True)
    loss2 = sft_loss(lp2, thought)
    loss2.backward()
    assert loss2.item() == loss.item()
    torch.testing.assert_close(lp2.grad, expected_grad)


def test_replay_sft_loss_is_a_per_target_mean_over_the_drawn_samples():
    """The reference's SFT loss (--sft-batch replay): each target's token mean, summed and divided
    by the samples drawn, those without a target included; a 1-token target weighs as much as a
    3-token one, where sft_loss weighs every token alike."""
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-6.0, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss = replay_sft_loss(lp, mask, samples=4)  # 4 drawn, 2 of them with a target
    assert loss.item() == pytest.approx((2.0 + 6.0) / 4)
    assert sft_loss(lp, mask).item() == pytest.approx(12.0 / 4)
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[-1 / 12] * 3, [-1 / 4, 0.0, 0.0]]))


def test_sft_loss_empty_mask_is_zero_with_grad():
    lp = torch.full((2, 3), -1.0, requires_grad=True)
    loss = sft_loss(lp, torch.zeros(2, 3))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(lp.grad, torch.zeros(2, 3))


def test_retry_temperatures():
    temps = retry_temperatures()
    assert len(temps) == 20
    assert temps[:3] == pytest.approx([0.2, 0.22, 0.242])
    assert all(a < b or b == 0.9 for a, b in zip(temps, temps[1:]))
    assert max(temps) == 0.9 and temps[-1] == 0.9
    # 0.2 * 1.1**15 = 0.835 < 0.9 <= 0.2 * 1.1**16 = 0.919
    assert temps[15] == pytest.approx(0.2 * 1.1**15) and temps[16] == 0.9
    assert len(retry_temperatures(max_tries=3)) == 3
    assert retry_temperatures(1.0, max_tries=3) == [1.0, 1.0, 1.0]  # a start above the cap stays
