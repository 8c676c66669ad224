"""Tests of the card environments (envs/): rules, seeding, answer parsing, experts, drawing."""
import itertools
import json
import random
import time
import warnings
from fractions import Fraction

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from envs import ENV_IDS, extract_thoughts, format_answer, parse_action
from envs.blackjack import BlackjackEnv, basic_strategy, hand_total
from envs.ez_points import EZPointsEnv
from envs.number_line import NumberLineEnv
from envs.points24 import Points24Env, _splits, complete, evaluate, expressions


def act(env, token):
    return env.step(env.actions.index(token))


def play(env, tokens):
    out = None
    for token in tokens:
        out = act(env, token)
    return out


def play_expert(env, max_steps=50):
    """Follow expert() to the end; returns (total reward, last info)."""
    total = 0.0
    for _ in range(max_steps):
        thoughts, action = env.expert()
        assert isinstance(thoughts, str) and thoughts
        # The expert's answer must survive the round trip through the answer format.
        assert env.parse(format_answer(thoughts, env.actions[action])) == action
        _, reward, terminated, truncated, info = env.step(action)
        total += reward
        if terminated or truncated:
            return total, info
    raise AssertionError("the expert did not finish the episode")


def brute_force_24(values, target=24):
    """Independent solver: repeatedly combine two numbers (exact fractions)."""
    def rec(nums):
        if len(nums) == 1:
            return nums[0] == target
        for i, j in itertools.permutations(range(len(nums)), 2):
            a, b = nums[i], nums[j]
            rest = [nums[k] for k in range(len(nums)) if k not in (i, j)]
            for c in [a + b, a - b, a * b] + ([a / b] if b else []):
                if rec(rest + [c]):
                    return True
        return False
    return rec([Fraction(v) for v in values])


def parenthesized_solutions(values, target=24, limit=2):
    """Up to ``limit`` solutions written with every pair in parentheses (redundant ones too)."""
    found = []

    def rec(items):
        if len(found) >= limit:
            return
        if len(items) == 1:
            if items[0][0] == target:
                found.append(items[0][1])
            return
        for i, j in itertools.permutations(range(len(items)), 2):
            (a, ta), (b, tb) = items[i], items[j]
            rest = [items[k] for k in range(len(items)) if k not in (i, j)]
            for op, value in (("+", a + b), ("-", a - b), ("*", a * b),
                              ("/", a / b if b else None)):
                if value is not None:
                    rec(rest + [(value, ("(",) + ta + (op,) + tb + (")",))])

    rec([(Fraction(v), (str(v),)) for v in values])
    return found


# ----------------------------------------------------------------------------- registration


def test_registered_and_spaces():
    assert ENV_IDS == ["gtr/NumberLine-v0", "gtr/EZPoints-v0", "gtr/Points24-v0",
                       "gtr/Blackjack-v0", "gtr/Household-v0"]
    for env_id in ENV_IDS:
        env = gym.make(env_id, image_size=64)
        obs, _ = env.reset(seed=0)
        game = env.unwrapped
        assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
        assert (env.observation_space.shape == (64, 64, 3)
                and env.observation_space.dtype == np.uint8)
        assert env.action_space.n == len(game.actions)
        env.close()
    assert gym.make("gtr/NumberLine-v0", max_position=3).unwrapped.max_position == 3


def test_action_lists():
    assert NumberLineEnv().actions == ["-", "+"]
    assert EZPointsEnv().actions == [str(i) for i in range(1, 11)] + ["+", "*", "="]
    assert Points24Env().actions == ([str(i) for i in range(1, 11)]
                                     + ["+", "-", "*", "/", "(", ")", "="])
    assert BlackjackEnv().actions == ["stand", "hit"]


@pytest.mark.parametrize("env_id", ENV_IDS)
@pytest.mark.parametrize("render_mode", [None, "rgb_array"])
def test_check_env(env_id, render_mode):
    env = gym.make(env_id, render_mode=render_mode, image_size=96)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    assert not caught, [str(w.message) for w in caught]


def test_constructor_validation():
    with pytest.raises(ValueError, match="image_size"):
        NumberLineEnv(image_size=10)
    with pytest.raises(ValueError, match="render_mode"):
        Points24Env(render_mode="human")
    with pytest.raises(ValueError, match="max_position"):
        NumberLineEnv(max_position=0)
    with pytest.raises(ValueError, match="action"):
        NumberLineEnv().step(2)


# ----------------------------------------------------------------------------- NumberLine


def test_number_line_rewards():
    env = NumberLineEnv()
    env.reset(options={"position": 2, "target": 4})
    _, reward, terminated, truncated, info = act(env, "+")
    assert (reward, terminated, truncated, info["position"]) == (0.0, False, False, 3)
    assert "success" not in info
    _, reward, terminated, truncated, info = act(env, "+")
    assert (reward, terminated, truncated, info["success"]) == (1.0, True, False, True)

    env.reset(options={"position": 2, "target": 4})
    assert act(env, "-")[1] == -1.0  # away from the target
    env.reset(options={"position": 0, "target": 3})
    _, reward, _, _, info = act(env, "-")  # stuck at the lower end
    assert reward == -1.0 and info["position"] == 0
    env.reset(options={"position": 5, "target": 1})
    _, reward, _, _, info = act(env, "+")  # stuck at the upper end
    assert reward == -1.0 and info["position"] == 5


def test_number_line_truncation_and_invalid_step():
    env = NumberLineEnv()
    env.reset(options={"position": 0, "target": 5})
    for i in range(10):
        _, reward, terminated, truncated, info = act(env, "-")
        assert reward == -1.0 and not terminated and truncated == (i == 9)
    assert info["success"] is False

    env.reset(options={"position": 1, "target": 3})
    _, reward, terminated, truncated, info = env.invalid_step()
    assert ((reward, terminated, truncated, info["position"], info["steps"])
            == (-1.0, False, False, 1, 1))
    for _ in range(9):
        out = env.invalid_step()
    assert out[3] and not out[2] and out[4]["success"] is False  # the invalid steps count

    small = NumberLineEnv(max_position=3)
    small.reset(options={"position": 0, "target": 3})
    assert [small.step(0)[3] for _ in range(6)] == [False] * 5 + [True]


def test_number_line_random_starts():
    env = NumberLineEnv(image_size=64)
    pairs = set()
    for seed in range(300):
        _, info = env.reset(seed=seed)
        assert info["position"] != info["target"]
        assert 0 <= info["position"] <= 5 and 0 <= info["target"] <= 5
        pairs.add((info["position"], info["target"]))
    assert len(pairs) == 30  # every start/target pair occurs


def test_number_line_expert():
    env = NumberLineEnv()
    for p, t in itertools.permutations(range(6), 2):
        env.reset(options={"position": p, "target": t})
        assert env.expert()[0] == f"current {p}, target {t}, so I move {'up' if t > p else 'down'}"
        total, info = play_expert(env)
        assert info["success"] and total == 1.0


# ----------------------------------------------------------------------------- EZPoints


def test_ez_points_rules():
    env = EZPointsEnv()
    env.reset(options={"cards": [3, 4]})
    rewards = [act(env, t)[1] for t in ["3", "*", "4"]]
    _, reward, terminated, truncated, info = act(env, "=")
    assert (rewards == [0.0, 0.0, 0.0]
            and (reward, terminated, truncated, info["success"]) == (10.0, True, False, True))
    assert info["formula"] == ["3", "*", "4"] and info["used_cards"] == [3, 4]

    env.reset(options={"cards": [13, 2]})  # a king counts 10
    assert play(env, ["10", "+", "2", "="])[1] == 10.0
    env.reset(options={"cards": [3, 4]})
    out = play(env, ["3", "+", "4", "="])
    assert out[1] == -1.0 and out[2] and out[4]["success"] is False
    env.reset(options={"cards": [3, 4]})
    out = play(env, ["3", "="])  # a card left unused
    assert out[1] == -1.0 and out[2] and out[4]["success"] is False


def test_ez_points_unavailable_number_and_truncation():
    env = EZPointsEnv()
    env.reset(options={"cards": [3, 4]})
    _, reward, terminated, truncated, info = act(env, "5")
    assert (reward, terminated, truncated, info["formula"]) == (-1.0, False, False, [" "])
    _, reward, _, _, info = act(env, "3")
    assert reward == 0.0
    _, reward, terminated, _, info = act(env, "3")  # the only 3 is already used
    assert reward == -1.0 and not terminated and info["formula"] == [" ", "3", " "]
    assert act(env, "=")[1] == -1.0  # a formula with a blank is never right

    env.reset(options={"cards": [3, 4]})
    for _ in range(6):  # lengths 1..6: the limit is checked before each action
        out = act(env, "+")
        assert out[1] == 0.0 and not out[2] and not out[3]
    # The length limit is a rule of the game, so it TERMINATES (no bootstrap from the unchanged
    # state, see points24.py); gym_cards flags it as truncated.
    _, reward, terminated, truncated, info = act(env, "3")
    assert (reward, terminated, truncated, info["success"]) == (-1.0, True, False, False)
    assert len(info["formula"]) == 6

    env.reset(options={"cards": [3, 4]})
    for i in range(7):  # invalid answers: blanks, and the same truncation
        _, reward, terminated, truncated, info = env.invalid_step()
        assert reward == -1.0 and not truncated and terminated == (i == 6)


def test_ez_points_deals_are_solvable():
    env = EZPointsEnv(image_size=64)
    for seed in range(150):
        _, info = env.reset(seed=seed)
        assert len(info["cards"]) == 2 and all(1 <= r <= 13 for r in info["cards"])
        a, b = info["values"]
        assert a + b == 12 or a * b == 12
        total, info = play_expert(env)
        assert info["success"] and total == 10.0


def test_ez_points_expert_on_fixed_deals():
    env = EZPointsEnv()
    for cards in ([3, 4], [6, 6], [2, 12], [11, 2], [5, 7], [2, 6]):
        env.reset(options={"cards": cards})
        total, info = play_expert(env)
        assert info["success"] and total == 10.0, cards
    env.reset(options={"cards": [1, 1]})  # unsolvable: give up at once
    thoughts, action = env.expert()
    assert env.actions[action] == "=" and "cannot" in thoughts


# ----------------------------------------------------------------------------- Points24


def test_formula_evaluation():
    cases = {"2 * 3 + 4": 10, "2 + 3 * 4": 14, "8 - 2 - 1": 5, "8 / 2 / 2": 2, "( 1 )": 1,
             "8 / ( 3 - 8 / 3 )": 24, "( ( 2 + 2 ) * ( 3 + 3 ) )": 24, "10 - 2 * ( 3 - 1 )": 6}
    for text, value in cases.items():
        assert evaluate(text.split()) == value, text
    for bad in ["", "+ 1", "1 +", "( 1", "1 )", "1 2", "1 ( 2 )", "( )", "1 / ( 2 - 2 )", "1 _",
                "- 1 + 3", "2 * * 3"]:
        assert evaluate([" " if t == "_" else t for t in bad.split()]) is None, bad


def test_points24_rules():
    env = Points24Env()
    env.reset(options={"cards": [8, 3, 8, 3]})  # float eval would give 23.999...
    _, reward, terminated, _, info = play(env, "8 / ( 3 - 8 / 3 ) =".split())
    assert (reward, terminated, info["success"]) == (10.0, True, True)

    env.reset(options={"cards": [2, 4, 1, 1]})  # gym_cards' eval read "2","4" as 24
    assert play(env, "2 4 * 1 * 1 =".split())[1] == -1.0
    env.reset(options={"cards": [1, 1, 2, 12]})
    assert play(env, "2 / ( 1 - 1 ) * 10 =".split())[1] == -1.0  # division by zero
    env.reset(options={"cards": [4, 6, 1, 1]})
    assert play(env, "( 4 * 6 * 1 * 1 =".split())[1] == -1.0  # unbalanced
    env.reset(options={"cards": [4, 6, 1, 1]})
    assert play(env, "4 * 6 * 1 =".split())[1] == -1.0  # a card unused
    env.reset(options={"cards": [4, 6, 1, 1]})
    _, reward, terminated, _, info = act(env, "7")
    assert (reward, terminated, info["formula"]) == (-1.0, False, [" "])
    _, reward, terminated, _, info = env.invalid_step()
    assert (reward, terminated, info["formula"]) == (-1.0, False, [" ", " "])


def test_points24_truncation():
    env = Points24Env()
    env.reset(options={"cards": [4, 6, 1, 1]})
    for _ in range(21):
        out = act(env, "(")
        assert out[1] == 0.0 and not out[2] and not out[3]
    _, reward, terminated, truncated, info = act(env, "=")  # 21 > 20: ended before '='
    assert (reward, terminated, truncated, info["success"]) == (-1.0, True, False, False)

    env.reset(options={"cards": [4, 6, 1, 1]})  # a formula of 20 tokens is still judged
    for _ in range(20):
        act(env, "(")
    _, reward, terminated, truncated, _ = act(env, "=")
    assert (reward, terminated, truncated) == (-1.0, True, False)
    env.reset(options={"cards": [4, 6, 1, 1]})
    out = play(env, "( ( ( ( ( ( 4 ) ) ) ) ) ) * 6 * 1 * 1".split())
    assert len(out[4]["formula"]) == 19 and act(env, "=")[1] == 10.0


def test_solver_matches_brute_force():
    rng = random.Random(0)
    deals = [(1, 1, 1, 1), (3, 3, 8, 8), (1, 5, 5, 5), (7, 7, 10, 10), (4, 4, 10, 10), (1, 2, 7, 9)]
    deals += [tuple(sorted(rng.randint(1, 10) for _ in range(4))) for _ in range(60)]
    for deal in deals:
        solution = complete((), deal, 24, "+-*/", True, 20)
        assert (solution is not None) == brute_force_24(deal), deal
        if solution is not None:
            assert evaluate(solution) == 24
            assert sorted(int(t) for t in solution if t.isdigit()) == list(deal)


def test_solver_completes_any_prefix_of_a_solution():
    """Exactness: every prefix of a solution (even one with redundant parentheses, the agent's
    way of writing) can be completed, and no completion is longer than the rest of it."""
    rng = random.Random(1)
    deals = [(3, 3, 8, 8), (1, 5, 5, 5), (2, 3, 4, 6)]
    while len(deals) < 10:
        deal = tuple(sorted(rng.randint(1, 10) for _ in range(4)))
        if brute_force_24(deal):
            deals.append(deal)
    for deal in deals:
        for solution in parenthesized_solutions(deal):
            for k in range(len(solution) + 1):
                rest = complete(solution[:k], deal, 24, "+-*/", True, 20)
                assert rest is not None and len(rest) <= len(solution) - k, (deal, solution[:k])
                assert evaluate(solution[:k] + rest) == 24


def test_solver_speed():
    rng = random.Random(2)
    deals = [tuple(sorted(rng.randint(1, 10) for _ in range(4))) for _ in range(20)]
    expressions.cache_clear()
    _splits.cache_clear()
    start = time.perf_counter()
    for deal in deals:
        complete((), deal, 24, "+-*/", True, 20)
    assert (time.perf_counter() - start) / len(deals) < 0.05


def test_points24_expert_on_fixed_deals():
    env = Points24Env()
    for cards in ([8, 3, 8, 3], [1, 2, 3, 4], [13, 11, 4, 1], [5, 5, 5, 1], [6, 6, 6, 6],
                  [9, 7, 2, 1]):
        env.reset(options={"cards": cards})
        total, info = play_expert(env)
        assert info["success"] and total == 10.0, cards
    env.reset(options={"cards": [1, 1, 1, 1]})
    thoughts, action = env.expert()
    assert env.actions[action] == "=" and "cannot make 24" in thoughts


def test_points24_expert_on_random_deals():
    env = Points24Env(image_size=64)
    for seed in range(25):
        _, info = env.reset(seed=seed)
        total, info = play_expert(env)
        assert info["success"] == brute_force_24(info["values"])
        assert total == (10.0 if info["success"] else -1.0)


def test_points24_expert_recovers_and_gives_up():
    env = Points24Env()
    env.reset(options={"cards": [8, 3, 8, 3]})
    play(env, ["(", "(", "8"])  # the agent's own start, with a redundant parenthesis
    total, info = play_expert(env)
    assert info["success"] and total == 10.0

    env.reset(options={"cards": [8, 3, 8, 3]})
    play(env, ["3", "*"])  # a dead end: 8 / (3 - 8 / 3) is the only solution
    thoughts, action = env.expert()
    assert env.actions[action] == "=" and "cannot reach 24" in thoughts

    env.reset(options={"cards": [4, 6, 1, 1]})
    act(env, "9")  # a blank can never be part of a right formula
    assert env.actions[env.expert()[1]] == "="


def test_card_options_validation():
    env = Points24Env()
    for bad, match in [([1, 2, 3], "wrong number"), ([0, 1, 2, 3], "1..13"),
                       ([1, 2, 3, 14], "1..13"), ("1234", "list"), ([1.0, 2, 3, 4], "1..13"),
                       ([True, 2, 3, 4], "1..13")]:
        with pytest.raises(ValueError, match=match):
            env.reset(options={"cards": bad})
    with pytest.raises(ValueError, match="unknown option"):
        env.reset(options={"card": [1, 2, 3, 4]})
    with pytest.raises(ValueError, match="wrong number"):
        EZPointsEnv().reset(options={"cards": [1, 2, 3, 4]})
    assert Points24Env().reset(options={})[1]["formula"] == []  # {} means a random deal


# ----------------------------------------------------------------------------- Blackjack


def bj(player, dealer, seed=0):
    env = BlackjackEnv(image_size=64)  # small pictures: these tests are about the rules
    env.reset(seed=seed, options={"player": player, "dealer": dealer})
    return env


def test_blackjack_stand_outcomes():
    cases = [([10, 9], [10, 7], 1.0), ([10, 7], [10, 9], -1.0), ([10, 8], [13, 8], 0.0),
             ([10, 8], [10, 6, 10], 1.0),  # the dealer is already bust
             ([10, 8], [1, 6], 1.0),  # a soft 17: the dealer stands
             ([1, 13], [10, 7], 1.0)]  # natural=False: a natural pays 1, not 1.5
    for player, dealer, expected in cases:
        env = bj(player, dealer)
        _, reward, terminated, truncated, info = env.step(0)
        assert ((reward, terminated, truncated, info["success"])
                == (expected, True, False, expected > 0))
        assert info["dealer"] == dealer  # a dealer on 17 or more does not draw


def test_blackjack_dealer_draws_to_17_and_hits():
    outcomes = set()
    for seed in range(40):
        env = bj([10, 9], [2, 3], seed)
        _, reward, _, _, info = env.step(0)
        dealer = hand_total(info["dealer"])[0]
        assert dealer >= 17 and len(info["dealer"]) > 2
        assert reward == (1.0 if dealer > 21 or dealer < 19 else 0.0 if dealer == 19 else -1.0)

        env = bj([10, 10], [9, 9], seed)
        _, reward, terminated, _, info = env.step(1)
        outcomes.add(terminated)
        assert len(info["player"]) == 3
        if terminated:
            assert reward == -1.0 and info["player_total"] > 21 and info["success"] is False
        else:  # only an ace keeps 20 alive
            assert reward == 0.0 and info["player"][2] == 1 and info["player_total"] == 21
    assert True in outcomes


def test_blackjack_invalid_step_forfeits():
    env = bj([10, 9], [10, 6])
    _, reward, terminated, truncated, info = env.invalid_step()
    assert (reward, terminated, truncated, info["success"]) == (-1.0, True, False, False)
    assert info["dealer"] == [10, 6]


def test_blackjack_hidden_card_and_options():
    a, b = bj([10, 5], [9, 2]), bj([10, 5], [9, 13])
    assert np.array_equal(a._observation(), b._observation())  # the hole card is face down
    assert not np.array_equal(a.step(0)[0], b.step(0)[0])  # and shown once the hand is over
    env = BlackjackEnv()
    for options, match in [({"player": [10, 10, 5], "dealer": [2, 3]}, "bust"),
                           ({"player": [10], "dealer": [2, 3]}, "wrong number"),
                           ({"player": [10, 2]}, "both"),
                           ({"player": [10, 0], "dealer": [2, 3]}, "1..13")]:
        with pytest.raises(ValueError, match=match):
            env.reset(options=options)


def test_basic_strategy_table():
    hit, stand = True, False
    assert basic_strategy(16, False, 10) is hit
    assert basic_strategy(16, False, 6) is stand
    assert basic_strategy(12, False, 2) is hit
    assert basic_strategy(12, False, 4) is stand
    assert basic_strategy(13, False, 3) is stand
    assert basic_strategy(17, False, 11) is stand
    assert basic_strategy(11, False, 11) is hit
    assert basic_strategy(17, True, 7) is hit
    assert basic_strategy(18, True, 7) is stand
    assert basic_strategy(18, True, 9) is hit
    assert basic_strategy(18, True, 11) is hit
    assert basic_strategy(19, True, 10) is stand
    env = bj([10, 6], [9, 13])
    assert env.expert() == ("my hand is hard 16 and the dealer shows 9, so I hit", 1)
    env = bj([1, 7], [1, 5])
    assert env.expert() == ("my hand is soft 18 and the dealer shows an ace, so I hit", 1)


def test_blackjack_expert_never_busts_on_hard_eleven_or_less():
    for first, second in itertools.product(range(2, 10), repeat=2):
        if first + second > 11:
            continue
        for up in range(1, 11):
            env = bj([first, second], [up, 10], seed=first * 100 + second * 10 + up)
            assert env.expert()[1] == 1
            _, reward, terminated, _, _ = env.step(1)
            assert not terminated and reward == 0.0


def test_blackjack_expert_plays_well():
    env = BlackjackEnv(image_size=64)
    expert, rand = [], []
    rng = np.random.default_rng(0)
    for seed in range(300):
        env.reset(seed=seed)
        expert.append(play_expert(env)[0])
        env.reset(seed=seed)
        done = False
        while not done:
            _, reward, done, _, _ = env.step(int(rng.integers(2)))
        rand.append(reward)
    assert np.mean(expert) > np.mean(rand) + 0.15 and np.mean(np.array(expert) > 0) > 0.35
    env.reset(options={"player": [10, 9], "dealer": [10, 7]})
    assert play_expert(env)[1]["success"]


# ----------------------------------------------------------------------------- seeding and images


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_seed_reproduces_the_state(env_id):
    env = gym.make(env_id, image_size=64).unwrapped
    seen = set()
    for seed in range(12):
        obs1, info1 = env.reset(seed=seed)
        step1 = env.step(1)
        obs2, info2 = env.reset(seed=seed)
        step2 = env.step(1)
        assert info1 == info2 and np.array_equal(obs1, obs2)
        assert step1[1:] == step2[1:] and np.array_equal(step1[0], step2[0])
        seen.add(json.dumps(info1, sort_keys=True))
    assert len(seen) > 3


def test_images_differ_between_states():
    pairs = [
        (NumberLineEnv, {"position": 2, "target": 4}, {"position": 3, "target": 4}),
        (EZPointsEnv, {"cards": [3, 4]}, {"cards": [3, 9]}),
        (Points24Env, {"cards": [1, 2, 3, 4]}, {"cards": [1, 2, 3, 13]}),
        (BlackjackEnv, {"player": [10, 5], "dealer": [9, 2]},
         {"player": [10, 6], "dealer": [9, 2]}),
    ]
    for cls, first, second in pairs:
        for size in (64, 300):
            env = cls(image_size=size, render_mode="rgb_array")
            a, _ = env.reset(seed=0, options=first)
            assert a.shape == (size, size, 3) and a.dtype == np.uint8
            assert np.array_equal(env.render(), a)
            assert a.min() < 60 and a.max() == 255  # dark ink on white
            b, _ = env.reset(seed=0, options=second)
            assert not np.array_equal(a, b), cls.__name__
    env = Points24Env()
    before, _ = env.reset(seed=0, options={"cards": [1, 2, 3, 4]})
    assert not np.array_equal(before, act(env, "(")[0])  # the formula is drawn
    assert Points24Env().render() is None  # no render mode


def test_options_validation_number_line():
    env = NumberLineEnv()
    for options, match in [({"position": 2}, "both"), ({"position": 6, "target": 1}, "0..5"),
                           ({"position": 2, "target": 2}, "differ"),
                           ({"position": True, "target": 1}, "integer")]:
        with pytest.raises(ValueError, match=match):
            env.reset(options=options)


# ----------------------------------------------------------------------------- text side


def test_prompts():
    for cls in (NumberLineEnv, EZPointsEnv, Points24Env, BlackjackEnv):
        env = cls()
        env.reset(seed=0)
        text = env.prompt()
        assert len(text.split()) < 120
        assert '{"thoughts": "...", "action": "..."}' in text
        assert all(f'"{a}"' in text for a in env.actions)
        env.reset(seed=1)
        assert env.prompt() == text  # the state is only in the image
    env = Points24Env()
    env.reset(options={"cards": [1, 2, 3, 4]})
    play(env, ["(", "10"])
    assert "J, Q and K count as 10" in env.prompt() and "Current formula: ( _" in env.prompt()
    assert "J, Q and K count 10" in BlackjackEnv().prompt()


def test_format_answer_and_thoughts():
    assert format_answer("a", "+") == '{"thoughts": "a", "action": "+"}'
    tricky = 'say "hi" \\ back\nslash, {"action": "-"} \'action\': \'-\' ünï'
    text = format_answer(tricky, "+")
    assert json.loads(text) == {"thoughts": tricky, "action": "+"}
    assert extract_thoughts(text) == tricky
    assert parse_action(text, ["-", "+"]) == 1  # the keys inside the thoughts do not count
    assert extract_thoughts("no json here") is None
    assert extract_thoughts('{"thoughts": 5}') is None
    assert extract_thoughts("{'thoughts': 'single', 'action': '+'}") == "single"
    assert extract_thoughts('{"thoughts": "cut off') == "cut off"


def test_every_action_reachable_through_parse():
    for cls in (NumberLineEnv, EZPointsEnv, Points24Env, BlackjackEnv):
        env = cls()
        for i, a in enumerate(env.actions):
            assert env.parse(format_answer("thinking about 1 and 10", a)) == i


def test_parse_cases():
    acts = Points24Env().actions
    one, ten, plus = acts.index("1"), acts.index("10"), acts.index("+")
    cases = {
        '{"thoughts": "x", "action": "10"}': ten,
        '{"thoughts": "x", "action": "1"}': one,
        '{"action": " 10 "}': ten,
        "{'thoughts': 'x', 'action': '+'}": plus,
        '```json\n{"thoughts": "x", "action": "+"}\n```': plus,
        'Sure! Here it is: {"thoughts": "x",\n  "action" :  "+"} hope it helps': plus,
        '{"action": "+", "action": "+"}': plus,  # the same action twice
        '{"action": "+", "action": "-"}': None,  # two different ones
        '{"action": "+"} {"action": "11"}': None,
        '{"action": {"action": "+"}}': plus,  # nested JSON
        '{"thoughts": {"action": "+"}}': plus,
        '{"action": "+': plus,  # cut off by the token limit
        '{"action": +}': plus,  # unquoted
        '{"action": 10}': ten,
        '{"action": "\\u002b"}': plus,
        '{"action": "plus"}': None,
        '{"action": ""}': None,
        '{"action": null}': None,
        '{"action": ["+"]}': None,  # a list is not an action name
        '"action"': None,
        "+": None,
        "": None,
        '{"thoughts": "the \\"action\\": \\"-\\" is wrong", "action": "+"}': plus,
        '{"thoughts": "unterminated {"action": "+"}': None,
    }
    for text, expected in cases.items():
        assert parse_action(text, acts) == expected, text
    assert parse_action(None, acts) is None and parse_action(b'{"action": "+"}', acts) is None


def test_parse_never_raises_on_fuzz():
    rng = random.Random(0)
    pieces = ['{', '}', '[', ']', '"', "'", ':', ',', '\\', '"action"', "'action'", '"action":',
              '"thoughts"', '"+"', "'10'", '10', '1', '+', '=', 'hit', 'stand', ' ', '\n', '```',
              '```json', 'ü', '\x00',
              '\\"', '\\u00', 'null', '{"action": "', '"}', '-', '*', '(', ')']
    action_lists = [NumberLineEnv.actions, EZPointsEnv().actions, Points24Env().actions,
                    BlackjackEnv.actions]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        if rng.random() < 0.2:
            text += "".join(chr(rng.randint(0, 0x2FFF)) for _ in range(rng.randint(0, 20)))
        for actions in action_lists:
            result = parse_action(text, actions)
            assert result is None or (isinstance(result, int) and 0 <= result < len(actions))
        thoughts = extract_thoughts(text)
        assert thoughts is None or isinstance(thoughts, str)


def test_parse_is_fast_on_huge_inputs():
    """Linear time on 1 MB answers: a quadratic scan would take hours, so the bound is only a hang
    guard (30 s, far above the ~1 s a linear scan takes even on a loaded machine), not a speed
    target."""
    mb = 10 ** 6
    acts = Points24Env().actions
    huge = ['"action": "' + "x" * mb, '{"action":' * (mb // 10), '"' * mb, "\\" * mb + '"',
            '"action"' + " " * mb, "'action': '+', " * (mb // 15), "{" * mb,
            '"action": "+"' + "a" * mb, '{"thoughts": "' + "\\\\" * mb,
            ('"x' * (mb // 2)), "'action'" * (mb // 8), '"action":"' * (mb // 10)]
    for text in huge:
        start = time.perf_counter()
        parse_action(text, acts)
        extract_thoughts(text)
        assert time.perf_counter() - start < 30.0, text[:30]
    assert parse_action("'action': '+', " * 1000, acts) == acts.index("+")
