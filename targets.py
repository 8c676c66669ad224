"""Scoring SFT targets: the teacher's answers, scored by the policy on the agent's own prompts.

docs/ALGORITHM.md §4.2: the SFT loss is the policy's NLL of the teacher's thought tokens, each
target a second answer to the same observation. `ActorCritic.forward(..., targets=...)` calls one
of these two in the same call that scores the agent's answers, so the PPO loss and the SFT loss
are one backward:
  score_targets                   the plain way: each prompt runs again, followed by its target
  score_targets_on_prompt_cache   continues from the prompt's keys and values of the agent's
                                  pass, so a target costs its own tokens only (the default; the
                                  plain way is for gradient checkpointing, whose layers keep no
                                  key-value cache)
Both return `target_logprobs`, `target_mask`, `target_thought_mask`, [batch, max_target_len],
left-aligned. What they need of the policy (an ActorCritic, policy.py, or anything with the same
public interface): `model` (a PeftModel), `device`, `tokenizer`, `collate(encoded, responses)`,
`score(hidden, ids)` and `aligned_masks(sequences, width, right)`. They import only torch.
With --sft-batch replay (the default) the targets are scored as answers of their own
observations instead (teacher.py:replay_loss), and these two serve --sft-batch rollout.
"""
import torch


def score_targets(policy, encoded, targets):
    """SFT guidance (docs/ALGORITHM.md §4.2): score one more answer per sample (a 1-D tensor,
    or None) at temperature 1 with `policy` (an ActorCritic), the plain way: each prompt is run
    again, followed by its target. Returns `target_logprobs`, `target_mask` and
    `target_thought_mask`, each [batch, max_target_len] and LEFT-aligned (the targets all start
    where the prompt ends).
    `score_targets_on_prompt_cache` gives the same outputs without the prompts' second pass;
    this one is for gradient checkpointing, whose layers keep no key-value cache."""
    targets = [t if t is not None else torch.zeros(0, dtype=torch.long) for t in targets]
    batch = policy.collate(encoded, targets)
    target_width = max(1, max(len(t) for t in targets))
    hidden = policy.model.get_base_model().model(
        **batch, use_cache=False).last_hidden_state  # [batch, seq, hidden]
    right_logprobs, _ = policy.score(hidden[:, -target_width - 1:-1],
                                    batch["input_ids"][:, -target_width:])
    target_mask, target_thought_mask, _ = policy.aligned_masks(
        targets, target_width, right=False)
    # Right-aligned (the batch's left padding) to left-aligned: row i's last len_i entries
    # first.
    shift = torch.tensor([target_width - len(t) for t in targets],
                         device=policy.device)[:, None]  # [batch, 1]
    columns = ((torch.arange(target_width, device=policy.device) + shift)
               % target_width)  # [batch, target_width]
    target_logprobs = right_logprobs.gather(1, columns)  # [batch, target_width]
    return {"target_logprobs": target_logprobs.masked_fill(~target_mask, 0.0),
            "target_mask": target_mask, "target_thought_mask": target_thought_mask}

def score_targets_on_prompt_cache(policy, targets, batch, agent_pass, positions, last_prompt):
    """SFT guidance (docs/ALGORITHM.md §4.2): score one more answer per sample (a 1-D tensor,
    or None) at temperature 1 as a second continuation of the SAME prompt.

    The prompt is run once: its keys and values (kept with their gradient) are reused, and
    the agent's answer is masked out, so a target costs its own tokens, not a second copy of
    the ~100 prompt tokens. `score_targets`'s outputs. It pays: with the plain path a PPO
    update with SFT targets took 1.98 times as long (`python scripts/sft_scoring.py`,
    docs/PERFORMANCE.md).
    """
    rows = torch.arange(len(targets), device=policy.device)
    targets = [t.to(policy.device) if t is not None
               else torch.zeros(0, dtype=torch.long, device=policy.device)
               for t in targets]
    target_width = max(1, max(len(t) for t in targets))
    target_ids = torch.full((len(targets), target_width), policy.tokenizer.pad_token_id,
                            dtype=torch.long, device=policy.device)  # [batch, target_width]
    for i, t in enumerate(targets):
        target_ids[i, :len(t)] = t
    target_mask, target_thought_mask, _ = policy.aligned_masks(
        targets, target_width, right=False)
    # Keys visible to the targets: the prompt (not its padding), NOT the agent's answer, and the
    # target's own earlier tokens (the causal mask adds the order).
    seen = batch["attention_mask"].clone()  # [batch, seq]
    seen[torch.arange(seen.shape[1], device=policy.device) > last_prompt[:, None]] = 0
    seen = torch.cat([seen, target_mask.long()], dim=1)  # [batch, seq + target_width]
    # Text positions: the three M-RoPE components are equal after the image, so the k-th
    # target token sits at (last prompt token's position) + 1 + k, as the agent's answer does.
    start = positions[:, rows, last_prompt]  # [3, batch]
    target_positions = (start[..., None] + 1
                        + torch.arange(target_width, device=policy.device))  # [3, batch, tw]
    continuation = policy.model.get_base_model().model(
        input_ids=target_ids, attention_mask=seen, position_ids=target_positions,
        cache=agent_pass.cache, use_cache=True).last_hidden_state  # [batch, tw, hidden]
    # Target token k is predicted from the last prompt token (k = 0) or from target token k-1.
    hidden = agent_pass.last_hidden_state
    predictors = torch.cat([hidden[rows, last_prompt][:, None], continuation[:, :-1]],
                           dim=1)  # [batch, tw, hidden]
    target_logprobs, _ = policy.score(predictors, target_ids)  # [batch, target_width]
    return {"target_logprobs": target_logprobs.masked_fill(~target_mask, 0.0),
            "target_mask": target_mask, "target_thought_mask": target_thought_mask}
