"""Thought collapse, measured (docs/ALGORITHM.md §4.5): every game's facts(), thought_grounding and
thought_diversity, the rollout's record of the state each answer replied to, and the metrics row."""
import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from envs import ENV_IDS, format_answer, thought_diversity, thought_grounding


def visited_states(env_id, count, seed=0):
    """(facts, expert thoughts) of `count` states met by an expert that plays a random move a third
    of the time, so that off-path states (blanks in a formula, long hands) are visited too."""
    env = gym.make(env_id).unwrapped
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    states = []
    while len(states) < count:
        thoughts, action = env.expert()
        states.append((env.facts(), thoughts))
        if rng.random() < 1 / 3:
            action = int(rng.integers(len(env.actions)))
        _, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            env.reset()
    return states


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_expert_thoughts_are_grounded_and_diverse(env_id):
    states = visited_states(env_id, 300)
    assert all(thought_grounding(thoughts, facts) == 1.0 for facts, thoughts in states)
    assert len({tuple(facts) for facts, _ in states}) >= 5  # Household has five kinds of object
    assert thought_diversity([t for _, t in states], [tuple(f) for f, _ in states]) == 1.0


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_a_constant_thought_scores_low(env_id):
    """The collapse GTR describes: one thought, whatever the state."""
    states = visited_states(env_id, 300, seed=1)
    constant = states[0][1]
    grounding = np.mean([thought_grounding(constant, facts) for facts, _ in states])
    assert grounding < 0.5
    assert thought_diversity([constant] * len(states), [tuple(f) for f, _ in states]) == 0.0


def test_grounding_by_hand():
    facts = ["current 1", "target 4"]
    assert thought_grounding("current 1, target 4, so I move up", facts) == 1.0
    assert thought_grounding("Current 1 and TARGET 4", facts) == 1.0  # any case
    assert thought_grounding("current 12, target 4", facts) == 0.5    # "current 1" is not in
                                                                      # "current 12"
    assert thought_grounding("target 1, current 4", facts) == 0.0     # the labels say which is
                                                                      # which
    assert thought_grounding(None, facts) == 0.0                      # no thoughts name nothing
    assert thought_grounding("cards 6, 10", ["6", "6"]) == 0.5        # a value on two cards: named
                                                                      # twice
    assert thought_grounding("cards 6, 6; 6 + 6 = 12", ["6", "6"]) == 1.0
    assert thought_grounding("cards 10, 2", ["1", "2"]) == 0.5        # "1" is not in "10"
    with pytest.raises(ValueError, match="facts is empty"):
        thought_grounding("anything", [])


def test_diversity_by_hand():
    thoughts, states = ["a", "a", "b", "b", None], [1, 1, 2, 3, 4]
    # Pairs of answers to different states: 10 - 1 = 9; of those, only (b, b) shares a thought.
    assert thought_diversity(thoughts, states) == pytest.approx(1 - 1 / 9)
    pairs = [(i, j) for i in range(5) for j in range(i) if states[i] != states[j]]
    assert thought_diversity(thoughts, states) == pytest.approx(
        np.mean([thoughts[i] != thoughts[j] for i, j in pairs]))
    # Several thoughts for one state neither raise nor lower it.
    assert thought_diversity(["x", "y", "z", "w"], [1, 1, 2, 2]) == 1.0
    assert thought_diversity(["x", "x", "z", "z"], [1, 1, 2, 2]) == 1.0
    assert thought_diversity([None, None], [1, 2]) == 0.0      # no thoughts are all alike
    assert math.isnan(thought_diversity(["x", "y"], [1, 1]))   # one state: nothing to compare
    with pytest.raises(ValueError, match="3 thoughts but 2 states"):
        thought_diversity(["x", "y", "z"], [1, 2])


def test_rollout_records_the_facts_of_the_state_each_answer_replied_to(make_policy):
    """Replaying the played actions on copies of the environments meets the recorded facts, step
    by step."""
    from rollout import Rollout
    torch.manual_seed(0)
    policy = make_policy()
    policy.eval()
    runner = Rollout([gym.make("gtr/NumberLine-v0") for _ in range(2)], seed=5)
    batch = runner.collect(policy, steps=6, temperature=1.0, max_new_tokens=8)
    assert len(batch.facts) == len(batch.texts) == len(batch.responses) == 12
    for i in range(2):
        replica = gym.make("gtr/NumberLine-v0").unwrapped
        replica.reset(seed=5 + i)
        for t in range(6):
            assert batch.facts[2 * t + i] == replica.facts()
            _, _, terminated, truncated, _ = replica.step(int(batch.actions[t, i]))
            if terminated or truncated:
                replica.reset()


def test_metrics_row_holds_grounding_and_diversity():
    """log_update's row: expert answers score 1 and 1; one answer repeated in every state scores
    low and 0."""
    import collections

    from plumbing.report import log_update
    from rollout import Batch
    states = visited_states("gtr/NumberLine-v0", 16)
    zeros = torch.zeros(2, 8)

    class Rows:
        def __init__(self):
            self.rows = []

        def write(self, row):
            self.rows.append(row)

    logs = dict.fromkeys(["explained_variance", "approx_kl", "clip_fraction", "guard_fraction",
                          "grad_norm_policy_loss", "grad_norm_value_loss", "env_steps_per_s"], 0.0)
    written = Rows()
    for texts in ([format_answer(thoughts, "+") for _, thoughts in states],
                  [format_answer(states[0][1], "+")] * 16):
        batch = Batch(encoded=[], responses=[], token_logprobs=[], old_logprobs=zeros, values=zeros,
                      next_values=zeros, rewards=zeros, format_rewards=zeros, terminated=zeros,
                      truncated=zeros, format_valid=zeros, actions=zeros, entropy=zeros,
                      thought_tokens=zeros, texts=texts, facts=[facts for facts, _ in states])
        log_update(written, batch, None, logs, {"update": 1, "env_steps": 16}, collections.deque(),
                   world=1)
    expert, constant = written.rows
    assert expert["thought_grounding"] == 1.0 and expert["thought_diversity"] == 1.0
    assert constant["thought_grounding"] < 0.5 and constant["thought_diversity"] == 0.0
