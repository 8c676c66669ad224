"""Tests for merge.py: TIES/linear/DARE on hand-made tensors, the SMA/EMA teacher, delta space."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import merge  # noqa: E402


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# ---------------------------------------------------------------- TIES

def test_ties_trim_keeps_largest_magnitudes():
    # density 0.6 of 5 entries keeps 3: -5, 3, -2.
    out = merge.ties([{"x": t(1.0, -5.0, 3.0, 0.5, -2.0)}], [1.0], density=0.6)
    assert torch.equal(out["x"], t(0.0, -5.0, 3.0, 0.0, -2.0))


def test_ties_trim_is_per_task_vector_and_trimmed_entries_do_not_vote():
    # density 0.5 of 4 keeps 2 per vector: tau1 -> [[3,0],[0,2]], tau2 -> [[0,-4],[1,0]].
    # Untrimmed, tau2's -1 at (0,0) would drag that mean to 1 and tau1's -1 at (0,1) to -2.5.
    tau1 = {"x": t([3.0, -1.0], [0.5, 2.0])}
    tau2 = {"x": t([-1.0, -4.0], [1.0, 0.2])}
    out = merge.ties([tau1, tau2], [1.0, 1.0], density=0.5)
    assert torch.equal(out["x"], t([3.0, -4.0], [1.0, 2.0]))


def test_ties_elects_sign_by_weighted_sum():
    # Weighted sum 3*1 - 1 - 1 = +1 (positive); unweighted sum 1 - 1 - 1 = -1 and the
    # majority count (2 of 3) would both say negative.
    vectors = [{"x": t(1.0)}, {"x": t(-1.0)}, {"x": t(-1.0)}]
    out = merge.ties(vectors, [3.0, 1.0, 1.0], density=1.0)
    assert torch.equal(out["x"], t(1.0))


def test_ties_weighted_disjoint_mean():
    # col 0: sign(4 + 2*2 - 1) = +, agreeing 1, 2: (1*4 + 2*2) / (1 + 2) = 8/3
    # col 1: sign(1 - 2*3 - 1) = -, agreeing 2, 3: (2*-3 + 1*-1) / (2 + 1) = -7/3
    vectors = [{"x": t(4.0, 1.0)}, {"x": t(2.0, -3.0)}, {"x": t(-1.0, -1.0)}]
    out = merge.ties(vectors, [1.0, 2.0, 1.0], density=1.0)
    assert torch.allclose(out["x"], t(8 / 3, -7 / 3))


def test_ties_zero_columns_give_zero_not_nan():
    # col 0 all zero; col 1 weighted sum exactly 0 (no elected sign); col 2 normal.
    vectors = [{"x": t(0.0, 1.0, 2.0)}, {"x": t(0.0, -1.0, 4.0)}]
    out = merge.ties(vectors, [1.0, 1.0], density=1.0)
    assert not torch.isnan(out["x"]).any()
    assert torch.equal(out["x"], t(0.0, 0.0, 3.0))


def test_ties_returns_input_dtype():
    vectors = [{"x": torch.randn(8).bfloat16()}, {"x": torch.randn(8).bfloat16()}]
    assert merge.ties(vectors, [0.5, 0.5])["x"].dtype == torch.bfloat16


def test_ties_of_identical_snapshots_is_the_trimmed_vector():
    tau = {"x": t(1.0, -5.0, 3.0, 0.5, -2.0)}
    out = merge.merge([tau, tau], [0.5, 0.5], method="ties", density=0.6)
    assert torch.equal(out["x"], t(0.0, -5.0, 3.0, 0.0, -2.0))


# ---------------------------------------------------------------- linear

def test_linear_hand_made():
    out = merge.linear([{"x": t([1.0, 2.0])}, {"x": t([3.0, 6.0])}], [1.0, 3.0])
    assert torch.allclose(out["x"], t([2.5, 5.0]))  # (1 + 9) / 4, (2 + 18) / 4


def test_merge_with_base_adds_base_back():
    base = {"x": t(10.0, 10.0)}
    sds = [{"x": t(11.0, 9.0)}, {"x": t(13.0, 9.0)}]
    assert torch.allclose(merge.merge(sds, [1.0, 1.0], "linear", base=base)["x"], t(12.0, 9.0))
    # TIES on the task vectors [1,-1], [3,-1]: both agree everywhere -> same mean.
    assert torch.allclose(merge.merge(sds, [1.0, 1.0], "ties", density=1.0, base=base)["x"],
                          t(12.0, 9.0))


# ---------------------------------------------------------------- teacher schedule

def test_teacher_weights_values():
    assert merge.teacher_weights(1, "sma") == (1.0, 0.0)
    assert merge.teacher_weights(1, "ema", 0.3) == (0.3, 0.7)
    assert merge.teacher_weights(4, "sma") == (0.25, 0.75)
    assert merge.teacher_weights(4, "ema", 0.3) == (0.3, 0.7)
    with pytest.raises(ValueError, match="k starts at 1"):
        merge.teacher_weights(0)
    with pytest.raises(ValueError, match="scheme"):
        merge.teacher_weights(2, "wma")


def _snapshot(seed):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)}


def test_sma_of_identical_snapshots_is_exact_identity():
    snap = _snapshot(0)
    teacher = None
    for k in range(1, 11):
        teacher = merge.update_teacher(teacher, snap, k, scheme="sma", method="linear")
        for name in snap:
            assert torch.equal(teacher[name], snap[name]), (k, name)


def test_sma_is_running_mean():
    snaps = [_snapshot(s) for s in range(10)]
    teacher = None
    for k, snap in enumerate(snaps, start=1):
        teacher = merge.update_teacher(teacher, snap, k, scheme="sma", method="linear")
    for name in snaps[0]:
        assert torch.allclose(teacher[name], torch.stack([s[name] for s in snaps]).mean(0),
                              atol=1e-6)


def test_ema_matches_closed_form():
    # pi_T^(K) = sum_{j=0}^{K-2} alpha (1-alpha)^j s_{K-j} + (1-alpha)^{K-1} s_1
    alpha, snaps = 0.3, [_snapshot(s) for s in range(6)]
    teacher = None
    for k, snap in enumerate(snaps, start=1):
        teacher = merge.update_teacher(teacher, snap, k, scheme="ema", alpha=alpha, method="linear")
    n = len(snaps)
    for name in snaps[0]:
        expected = (1 - alpha) ** (n - 1) * snaps[0][name]
        for j in range(n - 1):
            expected = expected + alpha * (1 - alpha) ** j * snaps[n - 1 - j][name]
        assert torch.allclose(teacher[name], expected, atol=1e-6)


def test_first_ema_merge_keeps_the_starting_teacher():
    """pi_T^(1) = alpha pi^(1) + (1 - alpha) pi_T^(0): the warm-started teacher is not thrown
    away."""
    start, first = _snapshot(0), _snapshot(1)
    teacher = merge.update_teacher(start, first, 1, scheme="ema", alpha=0.5, method="linear")
    for name in start:
        assert torch.allclose(teacher[name], 0.5 * first[name] + 0.5 * start[name], atol=1e-6)
    sma = merge.update_teacher(start, first, 1, scheme="sma", method="ties")
    # weight 0 on pi_T^(0): a copy
    assert all(torch.equal(sma[name], first[name]) for name in first)


def test_first_update_is_detached_clone():
    policy = {"x": torch.randn(3, requires_grad=True)}
    teacher = merge.update_teacher(None, policy, 1)
    assert not teacher["x"].requires_grad and teacher["x"].data_ptr() != policy["x"].data_ptr()
    assert torch.equal(teacher["x"], policy["x"].detach())


def test_first_ties_merge_from_a_zero_teacher_is_the_weighted_policy():
    """A real --model without --init starts LoRA at B = 0, and so does the teacher. TIES's zero
    entries abstain, but a B that is zero throughout has not moved: the first EMA merge gives
    alpha trim(B) (the linear 0.5x), not trim(B) at full weight; A, moved in both, as before."""
    torch.manual_seed(0)
    start = {"lora_A": torch.randn(4, 6), "lora_B": torch.zeros(5, 4)}
    policy = {"lora_A": start["lora_A"] + 0.01 * torch.randn(4, 6), "lora_B": torch.randn(5, 4)}
    teacher = merge.update_teacher(start, policy, 1, scheme="ema", alpha=0.5, method="ties",
                                   density=0.8)
    assert torch.allclose(teacher["lora_B"], 0.5 * merge._trim(policy["lora_B"], 0.8))
    both_moved = merge.ties([policy, start], [0.5, 0.5], density=0.8)["lora_A"]
    assert torch.equal(teacher["lora_A"], both_moved)
    # Entries trimmed to zero in a tensor that did move still abstain.
    moved = {"x": t([1.0, 0.0])}
    assert torch.equal(merge.ties([{"x": t([2.0, 4.0])}, moved], [0.5, 0.5], 1.0)["x"],
                       t([1.5, 4.0]))


# ---------------------------------------------------------------- DARE

def test_dare_drops_the_incoming_checkpoints_and_not_the_running_teacher():
    """Each DARE merge drops and rescales the new snapshots only: the old teacher, already a
    merge, enters whole, so the drop noise does not pile up update after update."""
    teacher, policy = {"x": torch.ones(1000)}, {"x": torch.zeros(1000)}
    merged = merge.update_teacher(teacher, policy, 2, scheme="ema", alpha=0.5, method="dare",
                                  density=0.5, seed=3)
    assert torch.equal(merged["x"], torch.full((1000,), 0.5))
    merged = merge.update_teacher(policy, teacher, 2, scheme="ema", alpha=0.5, method="dare",
                                  density=0.5, seed=3)
    assert set(merged["x"].tolist()) == {0.0, 1.0}  # the policy's entries: dropped or doubled


def test_dare_deterministic_per_seed():
    vectors = [_snapshot(1), _snapshot(2)]
    first = merge.dare(vectors, [0.5, 0.5], density=0.5, seed=7)
    again = merge.dare(vectors, [0.5, 0.5], density=0.5, seed=7)
    other = merge.dare(vectors, [0.5, 0.5], density=0.5, seed=8)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert any(not torch.equal(first[n], other[n]) for n in first)


def test_dare_unbiased_in_expectation():
    vectors, weights = [_snapshot(1), _snapshot(2)], [0.3, 0.7]
    expected = merge.linear(vectors, weights)
    n_seeds = 3000
    runs = [merge.dare(vectors, weights, density=0.5, seed=s) for s in range(n_seeds)]
    for name in expected:
        mean = torch.stack([r[name] for r in runs]).mean(0)
        assert torch.allclose(mean, expected[name], atol=0.1), name


# ---------------------------------------------------------------- LoRA delta space

PREFIX = "base_model.model.layers.0.self_attn.q_proj"


def _lora(a, b, head):
    return {f"{PREFIX}.lora_A.weight": a, f"{PREFIX}.lora_B.weight": b, "v_head.weight": head}


def _delta(sd):
    return sd[f"{PREFIX}.lora_B.weight"] @ sd[f"{PREFIX}.lora_A.weight"]  # [out, in]


def _relative_error(approx, exact):
    return (torch.linalg.norm(approx - exact) / torch.linalg.norm(exact)).item()


def _rank1_lora(seed, rank=2, n_in=6, n_out=5):
    # Rank-1 delta with an r=2 adapter: B's second column is zero, so B @ A = b a^T.
    g = torch.Generator().manual_seed(seed)
    b = torch.zeros(n_out, rank)
    b[:, 0] = torch.randn(n_out, generator=g)
    return _lora(torch.randn(rank, n_in, generator=g), b, torch.randn(1, 4, generator=g))


def test_lora_pairs():
    sd = _rank1_lora(0)
    assert merge.lora_pairs(sd) == {PREFIX: (f"{PREFIX}.lora_A.weight", f"{PREFIX}.lora_B.weight")}
    with pytest.raises(ValueError, match="no matching"):
        merge.lora_pairs({f"{PREFIX}.lora_A.weight": torch.zeros(2, 3)})


def test_delta_space_reproduces_mean_delta_and_factor_space_does_not():
    policy, teacher = _rank1_lora(1), _rank1_lora(2)
    true_mean = (_delta(policy) + _delta(teacher)) / 2  # rank <= 2 = r
    kwargs = dict(k=2, scheme="sma", method="linear")
    by_delta = merge.update_teacher(teacher, policy, space="delta", **kwargs)
    by_factor = merge.update_teacher(teacher, policy, space="factors", **kwargs)
    delta_error = _relative_error(_delta(by_delta), true_mean)
    factor_error = _relative_error(_delta(by_factor), true_mean)
    print(f"\nrank-1 deltas, r=2: delta-space rel. error {delta_error:.2e}, "
          f"factor-space {factor_error:.3f}")
    assert delta_error < 1e-5
    assert factor_error > 0.05
    # Non-LoRA tensors merge as they are; factor shapes are preserved.
    assert torch.allclose(by_delta["v_head.weight"],
                          (policy["v_head.weight"] + teacher["v_head.weight"]) / 2)
    assert all(by_delta[n].shape == policy[n].shape for n in policy)


def test_factor_space_gap_random_vs_identical_vs_close():
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    policy = _lora(rand(4, 16), rand(12, 4), rand(1, 4))
    gaps = {}
    for label, teacher in [
        ("random", _lora(rand(4, 16), rand(12, 4), rand(1, 4))),
        ("close (1% noise)", {n: v + 0.01 * rand(*v.shape) for n, v in policy.items()}),
        ("identical", {n: v.clone() for n, v in policy.items()}),
    ]:
        true_mean = (_delta(policy) + _delta(teacher)) / 2
        by_factor = merge.update_teacher(teacher, policy, 2, scheme="sma", method="linear")
        gaps[label] = _relative_error(_delta(by_factor), true_mean)
    print("\nfactor-space rel. Frobenius error vs mean(B@A): "
          + ", ".join(f"{k} {v:.2e}" for k, v in gaps.items()))
    assert gaps["random"] > 0.1
    assert gaps["close (1% noise)"] < 1e-3
    assert gaps["identical"] < 1e-6


def test_delta_space_ties_is_the_best_low_rank_fit_of_ties_over_the_deltas():
    """TIES in delta space: the EMA TIES of the two deltas B @ A, refactored to the adapter's
    rank by truncated SVD, so the merged adapter's delta is that merge's best rank-r fit; the
    factors keep their shapes."""
    policy, teacher = _rank1_lora(3), _rank1_lora(4)
    out = merge.update_teacher(teacher, policy, 3, scheme="ema", method="ties", space="delta")
    assert all(out[n].shape == policy[n].shape for n in policy)
    merged = merge.ties([{"d": _delta(policy)}, {"d": _delta(teacher)}], [0.5, 0.5],
                        density=0.8)["d"]
    rank = policy[f"{PREFIX}.lora_A.weight"].shape[0]
    u, singular, vh = torch.linalg.svd(merged)
    best = u[:, :rank] * singular[:rank] @ vh[:rank]
    assert _relative_error(_delta(out), best) < 1e-5
    assert _relative_error(_delta(out), merged) > 1e-3  # the merge itself has a higher rank


# ---------------------------------------------------------------- errors

def test_errors_name_the_problem():
    a, b = {"x": torch.zeros(2)}, {"x": torch.ones(2)}
    with pytest.raises(ValueError, match="unknown merge method 'mean'"):
        merge.merge([a, b], [0.5, 0.5], method="mean")
    with pytest.raises(ValueError, match="mismatched keys"):
        merge.merge([a, {"y": torch.ones(2)}], [0.5, 0.5])
    with pytest.raises(ValueError, match="mismatched shapes for 'x'"):
        merge.merge([a, {"x": torch.ones(3)}], [0.5, 0.5])
    with pytest.raises(ValueError, match="2 weights for 3 state dicts"):
        merge.merge([a, b, b], [0.5, 0.5])
    for density in (0.0, 1.5):
        with pytest.raises(ValueError, match="density must be in"):
            merge.merge([a, b], [0.5, 0.5], density=density)
    with pytest.raises(ValueError, match="space='delta' needs LoRA keys"):
        merge.update_teacher(a, b, 2, space="delta")
    with pytest.raises(ValueError, match="unknown merge space"):
        merge.update_teacher(a, b, 2, space="weights")


def test_delta_space_builds_one_layer_product_at_a_time(monkeypatch):
    """space='delta' never holds every layer's B @ A at once (52 GB for two 7B inputs): each
    merge call sees one layer's [out, in] products."""
    import merge as merge_module
    torch.manual_seed(0)
    policy = {f"layer{i}.lora_A.weight": torch.randn(4, 16) for i in range(3)}
    policy |= {f"layer{i}.lora_B.weight": torch.randn(12, 4) for i in range(3)}
    teacher = {k: v + 0.1 * torch.randn_like(v) for k, v in policy.items()}
    calls, real_merge = [], merge_module.merge

    def recording_merge(sds, *a, **k):
        calls.append(sorted(sds[0]))
        return real_merge(sds, *a, **k)

    monkeypatch.setattr(merge_module, "merge", recording_merge)
    merged = merge_module.update_teacher(teacher, policy, 2, method="linear", space="delta")
    assert calls == [["layer0"], ["layer1"], ["layer2"]]
    # rank-4 inputs, linear merge of rank <= 8, refactored to rank 4: the best fit
    for i in range(3):
        delta = merged[f"layer{i}.lora_B.weight"] @ merged[f"layer{i}.lora_A.weight"]
        exact = 0.5 * (policy[f"layer{i}.lora_B.weight"] @ policy[f"layer{i}.lora_A.weight"]
                       + teacher[f"layer{i}.lora_B.weight"] @ teacher[f"layer{i}.lora_A.weight"])
        assert torch.linalg.matrix_rank(delta) == 4
        assert (delta - exact).norm() <= torch.linalg.svdvals(exact)[4:].norm() + 1e-4
