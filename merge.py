"""Checkpoint merging for the GTR-Turbo teacher (GTR-Turbo §4.1; docs/ALGORITHM.md §4.1).

GTR-Turbo needs no external teacher: after every PPO update k the new policy weights are
merged into a running teacher,

    pi_T^(k) = merge({pi_theta^(k), pi_T^(k-1)}, weights {w_new, w_old})
    SMA: {1/k, (k-1)/k} (a running mean)      EMA: {alpha, 1-alpha} (alpha = 0.5 in the paper)

A "task vector" is a checkpoint minus a common base (zero for LoRA adapters). The merge
operators, all pure functions over state dicts (name -> tensor):
  linear  weighted average.
  ties    TIES-merging (Yadav et al. 2023): trim, elect sign, disjoint weighted mean.
  dare    DARE (Yu et al. 2024): random drop + rescale, then a weighted average.

Usage:
    import merge
    teacher = None
    for k, policy_state in enumerate(lora_snapshots, start=1):
        teacher = merge.update_teacher(teacher, policy_state, k, scheme="ema", alpha=0.5,
                                       method="ties", density=0.8)

Only torch and the standard library are imported, so this file can be copied elsewhere.
"""
import torch
from torch import Tensor

StateDict = dict[str, Tensor]
METHODS = ("linear", "ties", "dare")


def _weight_tensor(weights: list[float], n_dims: int) -> Tensor:
    """Weights as a float32 tensor shaped [n, 1, ..., 1] to broadcast over stacked tensors."""
    return torch.tensor(weights, dtype=torch.float32).view(-1, *([1] * n_dims))


def linear(state_dicts: list[StateDict], weights: list[float]) -> StateDict:
    """Weighted average sum_i w_i x_i / sum_i w_i, per tensor, computed in float32."""
    total = sum(weights)
    merged = {}
    for name, first in state_dicts[0].items():
        stacked = torch.stack([sd[name].float() for sd in state_dicts])  # [n, *shape]
        w = _weight_tensor([x / total for x in weights], first.dim()).to(stacked.device)
        # Written as x_0 + sum_i w_i (x_i - x_0), which equals the weighted mean when the
        # weights sum to 1, but with no rounding when all inputs are identical: then every
        # offset is exactly 0, so an SMA teacher of identical snapshots is exactly the identity.
        offsets = stacked - stacked[0]  # [n, *shape]
        merged[name] = (stacked[0] + (w * offsets).sum(0)).to(first.dtype)
    return merged


def _trim(task_vector: Tensor, density: float) -> Tensor:
    """Keep the round(density * numel) entries of largest magnitude (at least one), zero the
    rest."""
    flat = task_vector.flatten()  # [numel]
    n_keep = max(1, round(density * flat.numel()))
    kept = torch.zeros_like(flat)
    top = flat.abs().topk(n_keep).indices
    kept[top] = flat[top]
    return kept.view_as(task_vector)


def ties(task_vectors: list[StateDict], weights: list[float], density: float = 0.8) -> StateDict:
    """TIES-merging with weights (docs/ALGORITHM.md §4.1 steps 1-3), per tensor, computed in
    float32.

    Note: trimming makes TIES lossy even on identical inputs: merging n copies of tau returns
    trim(tau) (its smallest 1-density entries zeroed), not tau. Linear merging of identical
    snapshots is the identity.
    """
    merged = {}
    for name, first in task_vectors[0].items():
        # 1. Trim: top-`density` entries by magnitude of each task vector.
        trimmed = torch.stack(
            [_trim(tv[name].float(), density) for tv in task_vectors])  # [n, *shape]
        w = _weight_tensor(weights, first.dim()).to(trimmed.device)  # [n, 1, ..., 1]
        # 2. Elect: sign of the WEIGHTED sum, so a heavy checkpoint outvotes several light ones.
        elected = torch.sign((w * trimmed).sum(0))  # [*shape]
        # 3. Disjoint merge: sum_i w_i m_i tau_i / sum_i w_i m_i, m_i = kept and agreeing.
        # A trimmed entry is 0, whose sign never equals a non-zero elected sign, so m_i = 0
        # there; where the elected sign is 0 no vector agrees and the result is 0.
        agrees = ((torch.sign(trimmed) == elected) & (elected != 0)).float()  # [n, *shape]
        # A tensor that is zero throughout (LoRA's B as initialised: a teacher that starts at
        # B = 0) has not moved from the base; it was not trimmed. It agrees everywhere, adding
        # 0 with its full weight, so TIES({tau, 0}, {w, 1 - w}) = w trim(tau), as a linear
        # merge gives w tau, instead of trim(tau) at full weight.
        unmoved = (trimmed.flatten(1) == 0).all(1).view(-1, *([1] * first.dim()))  # [n, 1, ...]
        agrees = torch.where(unmoved, torch.ones_like(agrees), agrees)
        numerator = (w * agrees * trimmed).sum(0)  # [*shape]
        denominator = (w * agrees).sum(0)  # [*shape]
        # peft's `ties` divides by the COUNT of agreeing vectors, not by their weights; with the
        # weights {1/k, (k-1)/k} of an incremental merge that shrinks the teacher towards the
        # base (zero for LoRA) at every update. We normalise by the weights, as TIES writes it.
        # Where denominator is 0 the numerator is 0 too: divide by 1 to get 0, not NaN.
        safe_denominator = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
        merged[name] = (numerator / safe_denominator).to(first.dtype)
    return merged


def dare(task_vectors: list[StateDict], weights: list[float], density: float = 0.8,
         seed: int = 0, kept_whole: int = 0) -> StateDict:
    """DARE: drop each entry with probability 1-density, rescale the kept by 1/density, then
    average linearly. The last `kept_whole` task vectors are not dropped: a running teacher is
    already a merge, and dropping it again at every update would pile up its noise.

    The rescale keeps every task vector unbiased: E[mask / density * tau] = tau. The mask comes
    from a CPU torch.Generator seeded with `seed`, drawn over keys in sorted order and task
    vectors in list order, so the same seed gives the same merge on every process and device.
    """
    generator = torch.Generator().manual_seed(seed)
    dropped = [dict(tv) for tv in task_vectors]
    for name in sorted(task_vectors[0]):
        for tv, out in zip(task_vectors[:len(task_vectors) - kept_whole], dropped):
            tensor = tv[name].float()
            keep = torch.rand(tensor.shape, generator=generator) < density  # [*shape], CPU
            out[name] = (tensor * keep.to(tensor.device) / density).to(tv[name].dtype)
    return linear(dropped, weights)


def _check_inputs(state_dicts: list[StateDict], weights: list[float], method: str,
                  density: float, base: StateDict | None) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; expected one of {METHODS}")
    if not state_dicts:
        raise ValueError("merge needs at least one state dict")
    if len(weights) != len(state_dicts):
        raise ValueError(f"got {len(weights)} weights for {len(state_dicts)} state dicts")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    reference = state_dicts[0]
    for i, sd in enumerate(state_dicts[1:] + ([base] if base is not None else []), start=1):
        label = "base" if sd is base else f"state dict {i}"
        if sd.keys() != reference.keys():
            diff = sorted(sd.keys() ^ reference.keys())
            raise ValueError(f"mismatched keys between state dict 0 and {label}: {diff[:5]}")
        for name, tensor in sd.items():
            if tensor.shape != reference[name].shape:
                raise ValueError(f"mismatched shapes for {name!r} between state dict 0 and "
                                 f"{label}: {tuple(reference[name].shape)} vs "
                                 f"{tuple(tensor.shape)}")


@torch.no_grad()
def merge(state_dicts: list[StateDict], weights: list[float], method: str = "ties",
          density: float = 0.8, seed: int = 0, base: StateDict | None = None,
          kept_whole: int = 0) -> StateDict:
    """Merge task vectors tau_i = state_dicts[i] - base with `method`, then add base back.

    base=None means a zero base, the LoRA case: the adapter weights are the task vectors.
    `kept_whole`: DARE drops nothing of the last this many (see `dare`).
    """
    _check_inputs(state_dicts, weights, method, density, base)
    if base is None:
        task_vectors = state_dicts
    else:
        task_vectors = [{n: t.float() - base[n].float() for n, t in sd.items()}
                        for sd in state_dicts]
    if method == "linear":
        merged = linear(task_vectors, weights)
    elif method == "ties":
        merged = ties(task_vectors, weights, density)
    else:
        merged = dare(task_vectors, weights, density, seed, kept_whole)
    if base is None:
        return merged
    return {n: (t + base[n].float()).to(state_dicts[0][n].dtype) for n, t in merged.items()}


def teacher_weights(k: int, scheme: str = "sma", alpha: float = 0.5) -> tuple[float, float]:
    """(weight of the new policy checkpoint, weight of the previous teacher) for merge k >= 1.

    SMA: (1/k, (k-1)/k), so pi_T^(k) is the plain mean of the first k checkpoints (at k = 1
         the starting teacher pi_T^(0), if any, gets weight 0).
    EMA: (alpha, 1-alpha) for every k, so older checkpoints decay geometrically and a starting
         teacher pi_T^(0) (the warm-started policy) keeps weight (1-alpha)^k.
    """
    if k < 1:
        raise ValueError(f"merge index k starts at 1, got {k}")
    if scheme not in ("sma", "ema"):
        raise ValueError(f"unknown teacher scheme {scheme!r}; expected 'sma' or 'ema'")
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if scheme == "sma":
        return 1.0 / k, (k - 1) / k
    return alpha, 1.0 - alpha


def lora_pairs(state_dict: StateDict) -> dict[str, tuple[str, str]]:
    """Map each LoRA layer prefix to its (lora_A key [r, in], lora_B key [out, r]) (peft naming)."""
    pairs = {}
    for key in sorted(state_dict):
        if key.endswith(".lora_A.weight"):
            prefix = key[: -len(".lora_A.weight")]
            b_key = f"{prefix}.lora_B.weight"
            if b_key not in state_dict:
                raise ValueError(f"LoRA key {key!r} has no matching {b_key!r}")
            pairs[prefix] = (key, b_key)
    return pairs


@torch.no_grad()
def update_teacher(teacher: StateDict | None, policy: StateDict | list[StateDict], k: int,
                   scheme: str = "ema", alpha: float = 0.5, method: str = "ties",
                   density: float = 0.8, seed: int = 0, space: str = "factors") -> StateDict:
    """One teacher update (docs/ALGORITHM.md §4.1): merge({policy, teacher}, {w_new, w_old}).

    `policy` is the new checkpoint, or a list of snapshots of it: the reference's code saves
    one after each of the 4 PPO epochs and merges them with the old teacher in ONE call, the
    snapshots sharing w_new equally (EMA: alpha/4 each, 1 - alpha for the old teacher).
    Without a teacher the snapshots are merged alone, at equal weights.

    space="factors" merges every tensor as it is; for LoRA that merges the A and B factors
    separately, like the reference (peft's add_weighted_adapter). That is an approximation:
    mean(B) @ mean(A) != mean(B @ A). It holds while the checkpoints stay close, which they do
    between consecutive PPO updates.
    space="delta" (LoRA only) merges the weight deltas B @ A [out, in] themselves and refactors
    the result to the adapter's rank r by truncated SVD (the best rank-r approximation,
    Eckart-Young; exact when the merged delta has rank <= r). B @ A leaves out the LoRA scaling
    alpha/r, which is the same for both inputs and every operator here commutes with a positive
    scale, so it cancels. Tensors outside LoRA pairs (modules_to_save, value head) merge as they
    are.
    """
    snapshots = policy if isinstance(policy, list) else [policy]
    w_new, w_old = teacher_weights(k, scheme, alpha)
    inputs = snapshots + [teacher]  # the old teacher last
    weights = [w_new / len(snapshots)] * len(snapshots) + [w_old]
    if teacher is None or w_old == 0.0:
        inputs, weights = snapshots, [1.0 / len(snapshots)] * len(snapshots)
    if len(inputs) == 1:
        # One checkpoint and no previous teacher (or SMA's first merge): the teacher is a copy
        # of it, not a TIES merge of one input, which would trim it.
        return {n: t.detach().clone() for n, t in snapshots[0].items()}
    old_teacher = len(inputs) - len(snapshots)  # 1 or 0: DARE drops the new snapshots only
    if space == "factors":
        return merge(inputs, weights, method, density, seed, kept_whole=old_teacher)
    if space != "delta":
        raise ValueError(f"unknown merge space {space!r}; expected 'factors' or 'delta'")
    pairs = lora_pairs(snapshots[0])
    if not pairs:
        raise ValueError("space='delta' needs LoRA keys ('...lora_A.weight' / '...lora_B.weight'), "
                         "found none")
    _check_inputs(inputs, weights, method, density, None)
    lora_keys = {key for pair in pairs.values() for key in pair}
    others = [{n: t for n, t in sd.items() if n not in lora_keys} for sd in inputs]
    merged = (merge(others, weights, method, density, seed, kept_whole=old_teacher)
              if others[0] else {})
    # One layer at a time: for a 7B model all the B @ A of two inputs would take about 52 GB at
    # once, one layer's at most a few hundred MB. TIES trims each tensor on its own, so merging
    # layer by layer gives the same result; DARE draws layer i's masks from seed + i.
    for i, (prefix, (a_key, b_key)) in enumerate(pairs.items()):
        deltas = [{prefix: sd[b_key].float() @ sd[a_key].float()}
                  for sd in inputs]  # [out, in] each
        merged_delta = merge(deltas, weights, method, density, seed + i,
                             kept_whole=old_teacher)[prefix]  # [out, in]
        rank = snapshots[0][a_key].shape[0]
        u, s, vh = torch.linalg.svd(merged_delta, full_matrices=False)  # [out, m], [m], [m, in]
        root_s = s[:rank].sqrt()  # [r]
        dtype = snapshots[0][a_key].dtype
        merged[b_key] = (u[:, :rank] * root_s).to(dtype)  # B' = U_r sqrt(S_r) [out, r]
        merged[a_key] = (root_s[:, None] * vh[:rank]).to(dtype)  # A' = sqrt(S_r) V_r^T [r, in]
    return merged
