"""PPO for a text-generating VLM agent: the policy objective of RL4VLM / GTR-Turbo.

The agent answers each observation with a response y = (thought tokens, action tokens). Its
"action log-probability" is a weighted sum of per-token log-probs (docs/ALGORITHM.md §2), and PPO
(§3) treats that sum like the log-prob of an ordinary discrete action:

    log pi(a|o) = lambda * sum_thought log p(y_t) + sum_action log p(y_t)         (§2)
    A_t = GAE(gamma=0.9, lambda=0.95), truncated episodes bootstrap from V         (§3)
    L_pi = -mean(min(r A, clip(r, 1-c, 1+c) A)),  r = pi / pi_old,  c = 0.1        (§3)
    L_V  = 0.5 * mean((V - R)^2)   (the caller multiplies by the value coefficient 0.5)
    lr cosine-annealed from 1e-5 to 1e-9 over 25 updates                          (§3)

Usage (one update):

    adv, ret = gae(rewards, values, next_values, terminated, truncated)     # [T, N]
    adv = adv + format_bonus - beta * kl                # caller's additions (§3, §4.3);
                                                        # ret unchanged
    adv = normalize_advantages(adv.flatten())
    lp = sequence_logprob(token_logprobs(logits, tokens, 0.2), th_mask, act_mask, 0.5)
    pg, stats = policy_loss(lp, old_lp, adv[idx])
    loss = pg + 0.5 * value_loss(v, ret.flatten()[idx])
    for epoch in range(4):                              # as train.py:ppo_update, which also
        order = torch.randperm(len(adv)).tolist()       # stops early and logs diagnostics
        for minibatch in micro_batches(order, 128):
            norms, stepped = accumulated_step(          # loss_of(indices): their mean loss
                loss_of, minibatch, 8, optimizer, [(actor_params, 0.01), (critic_params, 1.0)])
    explained_variance(values, ret)                     # diagnostics an RL engineer reads, with
    gradient_norms({"policy": pg, "value": loss - pg}, lora)   # variance_shares, `stats`
"""
import contextlib
import math

import torch
import torch.distributed as dist


def gae(rewards, values, next_values, terminated, truncated, gamma=0.9, lam=0.95):
    """Generalised advantage estimation over T steps of N lockstep environments.

    All inputs are [T, N]. `next_values[t]` is V of the TRUE next state s_{t+1}: for a step
    that ended its episode by truncation it is the value of the final observation (not of the
    reset observation stored at t+1), for t = T-1 the value of the observation after the
    rollout. Returns (advantages, returns), float32 [T, N], returns = advantages + values.

    The format reward (§3) and the KL penalty -beta * KL_hat (§4.3) are NOT rewards
    here: the caller adds them to that step's advantage after GAE. They reach earlier steps
    only if the critic learns them too (its values enter every delta), which is why
    train.py trains the critic on these returns alone.
    """
    rewards, values, next_values = rewards.float(), values.float(), next_values.float()
    terminated, truncated = terminated.float(), truncated.float()  # [T, N]
    # A terminal state has value 0; a truncated one still has a future, so it bootstraps.
    deltas = rewards + gamma * next_values * (1.0 - terminated) - values  # [T, N]
    # Any episode end (either kind) stops the recursion: A_{t+1} belongs to another episode.
    not_done = 1.0 - torch.maximum(terminated, truncated)  # [T, N]
    advantages = torch.zeros_like(deltas)  # [T, N]
    running = torch.zeros_like(deltas[0])  # [N], A_T = 0 past the rollout
    for t in reversed(range(deltas.shape[0])):
        running = deltas[t] + gamma * lam * not_done[t] * running
        advantages[t] = running
    return advantages, advantages + values


def batch_moments(values):
    """(mean, variance, count) of `values` over the whole batch, float64 scalars: under
    torch.distributed (world > 1) every process's samples, so every process must call it. The
    variance is the population's (divided by the count)."""
    # Count, sum and sum of squares in float64: the variance is a difference of two large sums.
    flat = values.detach().double().flatten().cpu()  # [B]
    moments = torch.stack([torch.tensor(float(flat.numel()), dtype=torch.float64),
                           flat.sum(), (flat ** 2).sum()])  # [3]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":  # NCCL reduces GPU tensors only
            moments = moments.cuda()
        dist.all_reduce(moments)
    count, total, squares = moments.cpu()  # float64 scalars
    mean = total / count
    return mean, ((squares - total * mean) / count).clamp(min=0.0), count


def normalize_advantages(advantages, eps=1e-8):
    """Zero mean, unit std over the whole batch (§3), so the step size of the policy
    loss does not depend on the scale of the rewards.

    Under torch.distributed (world > 1) the batch is every process's samples, as in the
    reference, which normalises the rollout gathered from all its processes: statistics per
    process would scale one advantage differently on each process, and a process whose
    environments all won would see its best answers pushed down. A collective then: every
    process calls it. The std is Tensor.std's (Bessel's correction over all samples).
    """
    mean, variance, count = batch_moments(advantages)
    std = (variance * count / (count - 1)).sqrt()
    return ((advantages - mean) / (std + eps)).to(advantages.dtype)


def policy_loss(logprobs, old_logprobs, advantages, clip=0.1, ratio_guard=10.0, max_log_ratio=20.0):
    """Clipped PPO surrogate on [B] sequence log-probs. Returns (loss, stats).

    Ratio guard (the reference's blow-up guard, docs/ALGORITHM.md §3): a sequence log-prob sums
    dozens to hundreds of token log-probs, so a small change per token can make
    r = pi/pi_old explode. For A < 0 the min() of the plain surrogate then picks the unclipped
    r*A, a huge loss and gradient. A SAMPLE whose ratio exceeds `ratio_guard` uses only the
    clipped term, whose gradient is zero there: the sample drops out of the step. It acts per
    sample, as the reference's mini-batches of one did, so how a mini-batch is split into
    micro-batches (a memory setting) never changes the loss.

    The log-ratio is clamped to +-max_log_ratio before exp: exp overflows to inf above ~88,
    and clamp(inf) * A would give a NaN gradient (0 * inf) that no later step could undo.
    """
    log_ratio = (logprobs - old_logprobs).clamp(-max_log_ratio, max_log_ratio)  # [B]
    ratio = torch.exp(log_ratio)  # [B]
    clipped = torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * advantages  # [B]
    guarded = ratio.detach() > ratio_guard  # [B]
    per_sample = torch.where(guarded, clipped, torch.min(ratio * advantages, clipped))  # [B]
    loss = -per_sample.mean()
    with torch.no_grad():
        raw_log_ratio = logprobs - old_logprobs  # [B], unclamped, for the diagnostics
        stats = {
            # k3 estimator of KL(pi_old || pi) from samples of pi_old (Schulman, "Approximating
            # KL divergence"): unbiased, non-negative per sample, low variance.
            "approx_kl": ((ratio - 1.0) - log_ratio).mean(),
            "clip_fraction": ((ratio - 1.0).abs() > clip).float().mean(),
            "ratio_max": ratio.max(),
            "guard_fraction": guarded.float().mean(),
            "log_ratio_max": raw_log_ratio.abs().max(),
        }
    return loss, stats


def value_loss(values, returns, old_values=None, clip=None):
    """0.5 * mean((V - R)^2) on [B]; the value coefficient (0.5, §3) is applied by
    the caller. With `old_values` and `clip`, the PPO2 form: the pessimistic max of the plain
    error and the error of V kept within `clip` of the value at rollout time."""
    unclipped = (values - returns) ** 2  # [B]
    if clip is None:
        return 0.5 * unclipped.mean()
    values_clipped = old_values + torch.clamp(values - old_values, -clip, clip)  # [B]
    return 0.5 * torch.max(unclipped, (values_clipped - returns) ** 2).mean()


def masked_mean(x, mask, dim=-1):
    """Mean of x over the positions where mask is set; 0 (not NaN) where the mask is empty,
    e.g. the mean entropy of an answer's tokens."""
    mask = mask.bool()
    total = torch.where(mask, x, torch.zeros_like(x)).sum(dim)
    return total / mask.sum(dim).clamp(min=1).to(total.dtype)


def explained_variance(values, returns):
    """1 - Var(R - V) / Var(R) over the batch: 1 is a perfect critic, 0 one no better than the
    mean return, below 0 a critic that adds noise. NaN when the returns do not vary."""
    returns_var = returns.float().var()
    return ((1.0 - (returns.float() - values.float()).var() / returns_var).item()
            if returns_var > 0 else float("nan"))


def variance_shares(total, **parts):
    """{name: Var(part) / Var(total)} over the batch, e.g. which share of the advantages'
    variance comes from the environment's reward and which from a per-step bonus."""
    total_var = total.float().var().item()
    return {name: part.float().var().item() / total_var if total_var > 0 else float("nan")
            for name, part in parts.items()}


def gradient_norms(losses, params):
    """{name: L2 norm of d loss / d params} for each loss of a dict, e.g. the policy and the
    value loss on the backbone they share. Uses autograd.grad: the graph is kept for the
    real backward pass, and no .grad is touched."""
    norms = {}
    for name, loss in losses.items():
        grads = [g for g in torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
                 if g is not None]
        norms[name] = (torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()
                       if grads else 0.0)
    return norms


def micro_batches(indices, size):
    """The consecutive slices of `indices` of at most `size` each: how a mini-batch (or any list
    of sample indices) is cut to fit in memory."""
    for start in range(0, len(indices), size):
        yield indices[start:start + size]


def accumulate_gradient(micro_batch_loss, minibatch, micro_batch_size, model=None):
    """Add the gradient of a mini-batch of sample indices to the parameters' `.grad`,
    accumulated over its micro-batches (the reference's gradient accumulation; the micro-batch
    size is a memory setting only). `micro_batch_loss(indices)` returns that micro-batch's mean
    loss.

    `model`: a DistributedDataParallel module (or anything with `no_sync`) whose gradients are
    averaged over processes once, in the last micro-batch's backward, instead of in every one.
    """
    parts = list(micro_batches(minibatch, micro_batch_size))
    for number, idx in enumerate(parts):
        accumulating = number < len(parts) - 1 and hasattr(model, "no_sync")
        with model.no_sync() if accumulating else contextlib.nullcontext():
            (micro_batch_loss(idx) * len(idx) / len(minibatch)).backward()


def accumulated_step(micro_batch_loss, minibatch, micro_batch_size, optimizer, clip_groups,
                     model=None):
    """One optimizer step over a mini-batch: its gradient from zero (`accumulate_gradient`),
    then `clipped_step`. Returns (norms before clipping, one per group; stepped?)."""
    optimizer.zero_grad(set_to_none=True)
    accumulate_gradient(micro_batch_loss, minibatch, micro_batch_size, model)
    return clipped_step(optimizer, clip_groups)


def clipped_step(optimizer, clip_groups):
    """The optimizer step on accumulated gradients: each group of `clip_groups` [(params,
    max_norm), ...] clipped to its own norm (the actor's 0.01, the critic's own bound, so that
    neither spends the other's budget), and no step at all if a norm is not finite: one NaN would
    poison the weights for good (and, in GTR-Turbo, the teacher merged from them). Returns (the
    norms before clipping, one per group; stepped?)."""
    norms = [torch.nn.utils.clip_grad_norm_(params, max_norm).item()
             for params, max_norm in clip_groups]
    if not all(math.isfinite(norm) for norm in norms):
        optimizer.zero_grad(set_to_none=True)
        return norms, False
    optimizer.step()
    return norms, True


def cosine_lr(update, total_updates, lr, lr_min=1e-9):
    """Learning rate for `update` (0-based): cosine from lr at 0 to lr_min at total_updates,
    held at lr_min beyond (§3: 1e-5 -> 1e-9 over 25 updates)."""
    progress = min(max(update, 0), total_updates) / total_updates
    return lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * progress))


def token_logprobs(logits, tokens, temperature=1.0):
    """Log-prob of each sampled token, [B, L, V] logits and [B, L] tokens -> [B, L] float32.

    Logits are divided by the sampling temperature (§2), so the log-probs are those
    of the distribution the tokens were actually sampled from. The log-softmax runs in
    float32, unlike the reference's bfloat16: bfloat16 keeps 8 significant bits, so each
    token log-prob is off by ~0.4 % and a sequence sum near -100 is only resolved to steps of
    0.5, while PPO clips the ratio exp(lp - lp_old) at 1 +- 0.1.
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # [B, L, V]
    return logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)  # [B, L]


def per_token_entropy(logits):
    """Entropy of softmax(logits) over the last dim, in float32: [..., V] -> [...].
    Logged, not optimised (§3): its fall is the sign of entropy/thought collapse."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [..., V]
    # xlogy gives 0 * log 0 = 0 for tokens masked to -inf (0 * -inf would be NaN).
    return -torch.xlogy(logp.exp(), logp.exp()).sum(-1)  # [...]


def sequence_logprob(token_logprobs, thought_mask, action_mask, thought_coef):
    """Action log-prob of each response (§2): [B, L] -> [B].

        lambda * sum_{thought} log p + sum_{action} log p,   lambda = thought_coef

    lambda < 1 (0.5 card games, 0.2 ALFWorld) keeps the long thought from dominating the
    ratio. Masked positions are selected with where(), so padding never leaks in, not even
    as -inf * 0 = NaN.
    """
    zero = torch.zeros_like(token_logprobs)  # [B, L]
    thought = torch.where(thought_mask.bool(), token_logprobs, zero).sum(-1)  # [B]
    action = torch.where(action_mask.bool(), token_logprobs, zero).sum(-1)  # [B]
    return thought_coef * thought + action
