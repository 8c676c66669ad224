"""Teacher guidance for GTR-Turbo: how a merged-checkpoint teacher steers the agent's thoughts.

The teacher (a merge of the agent's own past checkpoints, docs/ALGORITHM.md §4.1) guides only the
THOUGHT tokens of each response (every token in the paper's ablation, train.py --guide-tokens
all: the mask passed below decides), in one of two ways:

  KL (variant B, docs/ALGORITHM.md §4.3, the better one): the teacher scores the agent's own sampled
  thought tokens; the per-step reverse-KL estimate is subtracted from the advantage:
      KL_hat = mean_l clip(log pi(th_l) - log pi_T(th_l), 0, 10),   A' = A - beta * KL_hat
  SFT (variant A, docs/ALGORITHM.md §4.2): the teacher writes its own answer (sampled at rising
  temperatures until it parses); the agent imitates its thought tokens:
      L = L_PPO + c_sft * L_SFT,   L_SFT = -log pi(teacher thought tokens)

Usage (KL variant, per rollout; log-probs [B, L] of the sampled tokens, no gradient needed):

    kl = kl_estimate(policy_lp, teacher_lp, thought_mask)       # [B], default "clip"
    advantages = kl_penalized_advantages(advantages, kl, beta=1.0)

Usage (SFT variant, per mini-batch; the policy's log-probs of the teacher's answer tokens):

    loss = ppo_loss + c_sft * sft_loss(policy_lp_of_teacher_answer, teacher_thought_mask)
"""
import torch

KL_ESTIMATORS = ("clip", "abs", "k3", "forward")


def kl_estimate(policy_logprobs, teacher_logprobs, mask, estimator="clip", max_value=10.0):
    """Per-sequence KL estimate between policy pi and teacher T over the tokens of `mask` (the
    guided ones: thought tokens), [B, L] -> [B].

    The tokens were sampled from pi, so with log_ratio = log pi - log T, averages over them
    estimate expectations under pi:
      clip:    clip(log_ratio, 0, max)     biased, non-negative, bounded (the paper's choice)
      abs:     |log_ratio|                 non-negative, but punishes pi < T as hard as pi > T
      k3:      exp(-log_ratio) + log_ratio - 1, Schulman's unbiased non-negative KL(pi||T)
      forward: r log r, r = T/pi clamped to [0, max]; E_pi[r log r] = sum T log(T/pi)
               = KL(T||pi). The importance weight r is unbounded where pi is small, hence
               the clamp (which biases the estimate down for rare tokens).

    Why reverse KL, clipped, on thought tokens only (docs/ALGORITHM.md §4.3 ablations): reverse KL
    is mode-seeking, so the agent may stay sharp on one of the teacher's modes, while forward
    KL forces it to cover all of them; clipping at 0 penalises only tokens the agent likes
    MORE than the teacher (where it drifts), never tokens it likes less, and the upper clip
    bounds a single token's penalty, which beat |.| and k3 in the paper. Action tokens are
    left to the reward: guiding them too pulled the agent towards the teacher's actions and
    hurt exploration.
    """
    log_ratio = policy_logprobs - teacher_logprobs  # [B, L]
    if estimator == "clip":
        per_token = log_ratio.clamp(0.0, max_value)
    elif estimator == "abs":
        per_token = log_ratio.abs()
    elif estimator == "k3":
        per_token = torch.exp(-log_ratio) + log_ratio - 1.0
    elif estimator == "forward":
        ratio = torch.exp(-log_ratio).clamp(0.0, max_value)  # [B, L], T/pi
        per_token = torch.xlogy(ratio, ratio)  # r log r, 0 at r = 0
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}, expected one of {KL_ESTIMATORS}")
    mask = mask.bool()  # the mean over the guided tokens; 0 (not NaN) where there are none
    total = torch.where(mask, per_token, torch.zeros_like(per_token)).sum(-1)  # [B]
    return total / mask.sum(-1).clamp(min=1).to(total.dtype)  # [B]


def kl_penalized_advantages(advantages, kl, beta=1.0):
    """A' = A - beta * KL_hat (docs/ALGORITHM.md §4.3), after GAE. The reference subtracts it from
    the return instead, which moves that step's advantage by the same amount. The KL is a
    penalty on the step, not a loss: it is detached so no gradient flows through it."""
    return advantages - beta * kl.detach()


def sft_loss(logprobs, mask, tokens=None):
    """Negative log-likelihood of the teacher's thought tokens (docs/ALGORITHM.md §4.2 L_SFT),
    scalar.

    `logprobs` [B, L] are the POLICY's log-probs of the teacher's answer tokens; `mask` [B, L]
    marks the tokens imitated: the thought tokens, which leaves out the action tokens (the
    agent's own action, substituted into the teacher's answer). Every token is imitated with
    --guide-tokens all, and in the warm start's SFT on demonstrations.
    The paper writes a per-sequence sum; this averages over the masked tokens, like a standard
    SFT loss, so that c_sft does not depend on how long the thoughts are. `tokens`: divide by
    this count instead of the masked tokens here, e.g. those of a whole mini-batch when its
    gradient is accumulated over micro-batches (so the split changes memory, not the loss).
    Zero, still attached to the graph, when the mask is empty.
    """
    mask = mask.bool()
    nll = -torch.where(mask, logprobs, torch.zeros_like(logprobs)).sum()
    count = mask.sum().clamp(min=1) if tokens is None else tokens
    return nll / torch.as_tensor(count, dtype=nll.dtype, device=nll.device)


def replay_sft_loss(logprobs, mask, samples):
    """The reference's SFT loss (docs/ALGORITHM.md §4.2, --sft-batch replay), scalar: each
    target's mean NLL over its masked tokens, summed and divided by `samples`, the mini-batch's
    sample count, which also counts the drawn samples that have no target (they add 0).

    `logprobs`, `mask` [B, L]: the policy's log-probs of B targets and the tokens imitated.
    Unlike `sft_loss`, a short target weighs as much as a long one.
    """
    mask = mask.bool()
    nll = -torch.where(mask, logprobs, torch.zeros_like(logprobs)).sum(-1)  # [B]
    per_target = nll / mask.sum(-1).clamp(min=1).to(nll.dtype)  # [B]
    return per_target.sum() / samples


def retry_temperatures(start=0.2, factor=1.1, cap=0.9, max_tries=20):
    """Sampling temperatures of the teacher's successive tries until its answer parses
    (docs/ALGORITHM.md §4.2): start, start*factor, start*factor^2, ... capped at `cap`
    (a start above the cap stays at the start)."""
    return [min(start * factor**i, max(cap, start)) for i in range(max_tries)]
