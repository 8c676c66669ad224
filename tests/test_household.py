"""Tests of gtr/Household-v0 (envs/household.py): commands and their admissibility, rewards and
episode ends, options, the expert on every task type, the picture, parsing multi-word commands,
the household tiny model and the per-environment defaults of train.py. check_env and seeding are
run for it by tests/test_envs.py, which covers every id of envs.ENV_IDS."""
import math
import random

import gymnasium as gym
import numpy as np
import pytest

from demonstrations import random_move
from envs import action_span, format_answer, parse_action
from envs.household import (
    CELL_PAD,
    OBJECT_COLORS,
    OBJECTS,
    PLACES,
    RECEPTACLES,
    STATE_COLORS,
    TASK_TYPES,
    TASKS,
    HouseholdEnv,
    kind,
)

LAYOUT = {"apple 1": "countertop 1", "potato 1": "fridge 1", "mug 1": "cabinet 1",
          "book 1": "desk 1", "cd 1": "drawer 1", "cd 2": "table 1"}


def fresh(task=None, objects=LAYOUT, seed=0, image_size=96):
    env = HouseholdEnv(image_size=image_size)
    options = {"objects": objects} if objects else {}
    if task:
        options["task"] = task
    env.reset(seed=seed, options=options)
    return env


def do(env, command):
    return env.step(env.actions.index(command))


def play_expert(env):
    """Follow expert() to the end; returns (total reward, last info, answers that parsed back)."""
    total = 0.0
    while True:
        thoughts, action = env.expert()
        answer = format_answer(thoughts, env.actions[action])
        assert env.parse(answer) == action
        assert env.actions[action] in env.admissible()  # the expert never wastes a step
        _, reward, terminated, truncated, info = env.step(action)
        total += reward
        if terminated or truncated:
            return total, info


def cell_pixels(env, obs, receptacle=None):
    """The pixels of a receptacle's grid cell, or of the middle cell (the hand) without one."""
    s = env.image_size
    if receptacle is None:
        return obs[s // 3 + 2:2 * s // 3 - 2, s // 3 + 2:2 * s // 3 - 2].reshape(-1, 3)
    x0, y0, x1, y1 = (int(v) for v in env._cell_box(receptacle))
    return obs[y0:y1, x0:x1].reshape(-1, 3)


def shows(pixels, color):
    return bool((np.abs(pixels.astype(int) - color).sum(-1) <= 6).any())


# ----------------------------------------------------------------------------- commands


def test_the_room_and_its_commands():
    env = HouseholdEnv()
    assert len(env.actions) == len(set(env.actions)) == env.action_space.n == 130
    for command in ["go to fridge 1", "open cabinet 1", "close drawer 1",
                    "take mug 1 from countertop 1", "put mug 1 in/on cabinet 1",
                    "clean mug 1 with sink 1", "heat potato 1 with microwave 1",
                    "cool apple 1 with fridge 1", "use desklamp 1", "examine book 1", "inventory",
                    "look"]:
        assert command in env.actions
    assert "heat book 1 with microwave 1" not in env.actions  # only food and dishes are treated
    assert 5 <= len(RECEPTACLES) <= 8 and 3 <= len(OBJECTS) <= 6


def test_multi_word_commands_parse_and_span():
    env = HouseholdEnv()
    for i, command in enumerate(env.actions):
        answer = format_answer("the mug is in the cabinet 1, so I go there", command)
        assert env.parse(answer) == i
        start, end = action_span(answer)
        assert answer[start:end] == f'"action": "{command}"}}'
    cases = {'{"thoughts": "x", "action": " take mug 1 from countertop 1 "}':
             "take mug 1 from countertop 1",
             "{'thoughts': 'x', 'action': 'put cd 2 in/on drawer 1'}": "put cd 2 in/on drawer 1",
             '{"thoughts": "x", "action": "take mug 1"}': None,
             '{"thoughts": "x", "action": "Go to fridge 1"}': None,
             '{"thoughts": "x", "action": "go to fridge 1", "action": "go to sink 1"}': None,
             '{"thoughts": "\\"action\\": \\"look\\"", "action": "inventory"}': "inventory",
             '{"action": "put mug 1 in/on cabinet': None}
    for text, expected in cases.items():
        assert env.parse(text) == (None if expected is None else env.actions.index(expected)), text


def test_parse_never_raises_on_fuzz():
    actions = HouseholdEnv.actions
    rng = random.Random(0)
    pieces = ['{', '}', '"', "'", ':', ',', '\\', '"action"', '"action": "', '"thoughts"', "go to ",
              "fridge 1", "take ", "mug 1", " from ", "put ", " in/on ", "/", "cabinet 1", "look",
              " ", "\n", "ü", "\x00", '"}']
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 25)))
        result = parse_action(text, actions)
        assert result is None or 0 <= result < len(actions)


def test_admissible_commands_follow_the_state():
    env = fresh({"type": "pick_and_place_simple", "object": "mug", "target": "table 1"})
    start = env.admissible()
    assert start == [f"go to {r}" for r in RECEPTACLES] + ["inventory", "look"]
    do(env, "go to cabinet 1")  # closed: its contents are neither listed nor takeable
    here = set(env.admissible())
    assert ({"open cabinet 1", "examine mug 1", "take mug 1 from cabinet 1"} & here
            == {"open cabinet 1"})
    assert "go to cabinet 1" not in here and "The cabinet 1 is closed." in env.prompt()
    do(env, "open cabinet 1")
    here = set(env.admissible())
    assert ({"close cabinet 1", "take mug 1 from cabinet 1", "examine mug 1"} <= here
            and "open cabinet 1" not in here)
    assert "In the cabinet 1, you see a mug 1." in env.prompt()
    do(env, "take mug 1 from cabinet 1")
    here = set(env.admissible())
    assert {"put mug 1 in/on cabinet 1", "examine mug 1"} <= here
    assert not any(c.startswith("take ") for c in here)  # one object at a time
    do(env, "go to sink 1")
    assert ("clean mug 1 with sink 1" in env.admissible()
            and "heat mug 1 with microwave 1" not in env.admissible())
    do(env, "go to desk 1")
    assert {"use desklamp 1", "put mug 1 in/on desk 1", "examine book 1"} <= set(env.admissible())
    # the admissible ones, and the JSON example
    assert env.prompt().count('"') == 2 * len(env.admissible()) + 8


def test_inadmissible_command_changes_nothing_and_costs_the_penalty():
    rng = np.random.default_rng(0)
    env = HouseholdEnv(image_size=64)
    for seed in range(30):
        env.reset(seed=seed)
        for _ in range(int(rng.integers(0, 5))):  # somewhere along the expert's way, before its end
            if env.step(env.expert()[1])[2]:
                env.reset(seed=seed)
        before = env._observation()
        state = (env.location, env.holding, dict(env.where), sorted(env.opened), env.lamp_on,
                 env.admissible())
        bad = [i for i, c in enumerate(env.actions) if c not in env.admissible()]
        for step in (lambda: env.step(int(rng.choice(bad))), env.invalid_step):
            steps = env.steps
            obs, reward, terminated, truncated, info = step()
            assert ((reward, terminated, truncated, info["steps"], info["feedback"])
                    == (-1.0, False, False, steps + 1, "Nothing happens."))
            assert np.array_equal(obs, before)
            assert state == (env.location, env.holding, dict(env.where), sorted(env.opened),
                             env.lamp_on, env.admissible())


def test_success_reward_and_time_limit():
    env = fresh({"type": "pick_and_place_simple", "object": "apple", "target": "table 1"})
    rewards = [do(env, c)[1]
               for c in ["go to countertop 1", "take apple 1 from countertop 1", "go to table 1"]]
    _, reward, terminated, truncated, info = do(env, "put apple 1 in/on table 1")
    assert (rewards == [0.0, 0.0, 0.0]
            and (reward, terminated, truncated, info["success"]) == (50.0, True, False, True))

    env = fresh({"type": "pick_and_place_simple", "object": "apple", "target": "table 1"})
    for i in range(50):  # "look" is always admissible and never helps: a time limit, not a rule
        _, reward, terminated, truncated, info = do(env, "look")
        assert reward == 0.0 and not terminated and truncated == (i == 49)
    assert info["success"] is False
    with pytest.raises(RuntimeError, match="reset"):
        env.expert()


def test_treatments_and_the_light():
    env = fresh({"type": "pick_heat_then_place_in_recep", "object": "apple", "target": "cabinet 1"})
    for command in ["go to countertop 1", "take apple 1 from countertop 1", "go to fridge 1",
                    "cool apple 1 with fridge 1"]:
        do(env, command)
    assert env.states["apple 1"] == {"cool"}
    do(env, "go to microwave 1")
    assert (do(env, "heat apple 1 with microwave 1")[4]["feedback"]
            == "You heat the apple 1 using the microwave 1.")
    do(env, "go to sink 1")
    do(env, "clean apple 1 with sink 1")
    assert (env.states["apple 1"] == {"hot", "clean"}
            and do(env, "examine apple 1")[4]["feedback"] == "This is a clean hot apple 1.")
    do(env, "go to cabinet 1")
    assert "put apple 1 in/on cabinet 1" not in env.admissible()  # closed
    do(env, "open cabinet 1")
    assert do(env, "put apple 1 in/on cabinet 1")[1:3] == (50.0, True)

    env = fresh({"type": "look_at_obj_in_light", "object": "book"})
    do(env, "go to desk 1")
    assert do(env, "use desklamp 1")[1:3] == (0.0, False)  # the lamp alone is not the goal
    do(env, "take book 1 from desk 1")  # holding it where the lamp is on: looked at in the light
    assert env._goal_met()
    env = fresh({"type": "look_at_obj_in_light", "object": "cd"})
    for command in ["go to desk 1", "use desklamp 1", "use desklamp 1", "go to table 1",
                    "take cd 2 from table 1"]:
        do(env, command)
    assert not env.lamp_on and do(env, "go to desk 1")[2] is False
    assert do(env, "use desklamp 1")[1:3] == (50.0, True)


def test_pick_two_needs_both():
    env = fresh({"type": "pick_two_obj_and_place", "object": "cd", "target": "countertop 1"})
    for command in ["go to table 1", "take cd 2 from table 1", "go to countertop 1"]:
        do(env, command)
    assert do(env, "put cd 2 in/on countertop 1")[1:3] == (0.0, False)
    for command in ["go to drawer 1", "open drawer 1", "take cd 1 from drawer 1",
                    "go to countertop 1"]:
        do(env, command)
    assert do(env, "put cd 1 in/on countertop 1")[1:3] == (50.0, True)
    assert env.goal == "put two cds on the countertop"


# ----------------------------------------------------------------------------- expert


def test_expert_solves_every_task_object_and_place():
    env = HouseholdEnv(image_size=48)  # the rules, not the picture: small frames are fast
    for task_type, (kinds, _, _) in TASKS.items():
        for what in kinds:
            for target in [None] if task_type == "look_at_obj_in_light" else PLACES:
                for seed in range(2):
                    env.reset(seed=seed, options={"task": {"type": task_type, "object": what,
                                                           "target": target}})
                    total, info = play_expert(env)
                    assert info["success"] and total == 50.0 and info["steps"] <= 30, (
                        task_type, what, target)


def test_expert_solves_random_deals():
    """1000 fresh deals, every one solved within the 50-step limit; the search by the text takes
    12.1 steps on average and 23 at most (the module docstring reports these)."""
    env = HouseholdEnv(image_size=48)
    seen, lengths = set(), []
    for seed in range(1000):
        _, info = env.reset(seed=seed)
        seen.add(info["task_type"])
        total, info = play_expert(env)
        assert info["success"] and total == 50.0, seed
        lengths.append(info["steps"])
    assert seen == set(TASK_TYPES)
    assert max(lengths) == 23 and np.mean(lengths) == pytest.approx(12.1, abs=0.05)


def test_expert_chooses_from_the_text_alone():
    """Every choice of the expert is in the prompt it reads (goal, feedback, admissible
    commands): over its own play of 300 deals no prompt gets two different commands, so a policy
    without memory can imitate it. Two deals that differ only in where the mug stands look
    different and read the same until the feedback lists the mug, and the expert plays the same
    commands in both until then: it never reads the picture."""
    env = HouseholdEnv(image_size=48)
    chosen = {}
    for seed in range(300):
        env.reset(seed=seed)
        done = False
        while not done:
            action = env.expert()[1]
            assert chosen.setdefault(env.prompt(), action) == action, seed
            done = any(env.step(action)[2:4])
    task = {"type": "pick_clean_then_place_in_recep", "object": "mug", "target": "table 1"}
    a = fresh(task, LAYOUT | {"mug 1": "countertop 1"})
    b = fresh(task, LAYOUT | {"mug 1": "desk 1"})
    assert not np.array_equal(a._observation(), b._observation())  # the mug is in sight in both
    while a.prompt() == b.prompt():
        assert a.expert()[1] == b.expert()[1]
        a.step(a.expert()[1])
        b.step(b.expert()[1])
    assert "mug 1" in a.feedback + b.feedback


def test_expert_recovers_from_detours():
    env = HouseholdEnv(image_size=48)
    rng = np.random.default_rng(1)
    for seed in range(40):
        env.reset(seed=seed)
        for _ in range(10):  # admissible detours: it puts wrong things down, reopens, goes back
            command = env.admissible()[int(rng.integers(len(env.admissible())))]
            if do(env, command)[2]:
                break
        if not env._goal_met():
            total, info = play_expert(env)
            assert info["success"] and total == 50.0


# ----------------------------------------------------------------------------- options and seeding


def test_options_fix_layout_and_task():
    cells = list(reversed(RECEPTACLES))
    task = {"type": "pick_cool_then_place_in_recep", "object": "potato", "target": "drawer 1"}
    env = HouseholdEnv(image_size=64)
    first, info = env.reset(seed=1, options={"task": task, "cells": cells, "objects": LAYOUT})
    assert (env.cells == cells and env.where == LAYOUT
            and info["goal"] == "put a cool potato in the drawer")
    again, _ = env.reset(seed=99, options={"task": task, "cells": cells, "objects": LAYOUT})
    assert np.array_equal(first, again)  # nothing left to chance
    _, info = env.reset(seed=2, options={"task": task})
    assert (info["task_type"] == "pick_cool_then_place_in_recep"
            and env.where["potato 1"] != "drawer 1")

    for seed in range(100):  # random deals: no object of the goal's kind starts at the goal's place
        env.reset(seed=seed)
        _, what, target = env.task
        assert all(env.where[o] != target for o in OBJECTS if kind(o) == what)
        assert sorted(env.cells) == sorted(RECEPTACLES)


@pytest.mark.parametrize("options, match", [
    ({"task": {"type": "pick_and_fly"}}, "not one of"),
    ({"task": {"type": "pick_heat_then_place_in_recep", "object": "book", "target": "table 1"}},
     "takes an object"),
    ({"task": {"type": "look_at_obj_in_light", "object": "book", "target": "desk 1"}}, "no target"),
    ({"task": {"type": "pick_and_place_simple", "object": "mug", "target": "fridge 1"}},
     "needs a target"),
    ({"task": "put a mug in the cabinet"}, "must be a dict"),
    ({"cells": RECEPTACLES[:7]}, "each of"),
    ({"objects": {"mug 1": "table 1"}}, "map each of"),
    ({"objects": LAYOUT | {"mug 1": "garden 1"}}, "receptacles are"),
    ({"objects": LAYOUT,
      "task": {"type": "pick_and_place_simple", "object": "mug", "target": "cabinet 1"}},
     "met before"),
    ({"layout": {}}, "unknown option"),
])
def test_bad_options_fail_clearly(options, match):
    with pytest.raises(ValueError, match=match):
        HouseholdEnv(image_size=48).reset(options=options)


# ----------------------------------------------------------------------------- picture and prompt


def test_picture_shows_objects_the_agent_and_what_it_holds():
    env = fresh({"type": "pick_clean_then_place_in_recep", "object": "mug", "target": "table 1"},
                image_size=150)
    obs = env._observation()
    assert shows(cell_pixels(env, obs, "countertop 1"), OBJECT_COLORS["apple"])  # on display
    # behind a closed door
    assert not shows(cell_pixels(env, obs, "cabinet 1"), OBJECT_COLORS["mug"])
    do(env, "go to cabinet 1")
    framed = do(env, "open cabinet 1")[0]
    assert shows(cell_pixels(env, framed, "cabinet 1"), OBJECT_COLORS["mug"])
    assert not shows(cell_pixels(env, framed, None), OBJECT_COLORS["mug"])
    x0, y0, _, _ = (int(v) for v in env._cell_box("cabinet 1"))
    pad = int(env.image_size * CELL_PAD)
    assert shows(framed[y0 - pad:y0, x0:x0 + 20].reshape(-1, 3), (0, 90, 255))  # the blue frame
    held = do(env, "take mug 1 from cabinet 1")[0]
    assert shows(cell_pixels(env, held, None), OBJECT_COLORS["mug"])  # in hand, in the middle
    assert not shows(cell_pixels(env, held, "cabinet 1"), OBJECT_COLORS["mug"])
    do(env, "go to sink 1")
    clean = do(env, "clean mug 1 with sink 1")[0]
    assert (shows(cell_pixels(env, clean, None), STATE_COLORS["clean"])
            and not shows(cell_pixels(env, held, None), STATE_COLORS["clean"]))
    do(env, "go to desk 1")
    lamp_off = env._observation()
    assert not np.array_equal(lamp_off, do(env, "use desklamp 1")[0])


def test_prompt_and_tiny_tokenizer(tmp_path):
    """The prompt gives the goal, the last feedback and the admissible commands, and stays short
    in the household tiny model's tokens; its folder is apart from the card games' one."""
    from transformers import AutoTokenizer

    from plumbing.tinyvlm import tiny_model
    folder = tiny_model(str(tmp_path), family="household")
    assert folder.endswith("household-seed0-112px")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    env = HouseholdEnv(image_size=48)
    prompt_lengths, answer_lengths = [], []
    for seed in range(20):
        env.reset(seed=seed)
        done = False
        while not done:
            text = env.prompt()
            assert f"Your task is to: {env.goal}." in text and env.feedback in text
            assert all(f'"{c}"' in text for c in env.admissible())
            thoughts, action = env.expert()
            prompt_lengths.append(len(tokenizer(text)["input_ids"]))
            answer_lengths.append(
                len(tokenizer(format_answer(thoughts, env.actions[action]))["input_ids"]))
            done = any(env.step(action)[2:4])
    # train.py answers up to 64 tokens
    assert max(prompt_lengths) <= 256 and max(answer_lengths) <= 48
    with pytest.raises(ValueError, match="unknown environment family"):
        tiny_model(str(tmp_path), family="chess")


def test_train_applies_the_environments_defaults():
    from train import parse_args
    household = parse_args(["--env", "gtr/Household-v0"])
    assert ((household.thought_coef, household.format_reward, household.format_penalty)
            == (0.2, 5.0, -5.0))
    assert (household.updates, household.eval_episodes) == (40, 32)
    given = parse_args(["--env", "gtr/Household-v0", "--thought-coef", "0.5",
                        "--format-penalty=-1"])
    assert (given.thought_coef, given.format_reward, given.format_penalty) == (0.5, 5.0, -1.0)
    cards = parse_args(["--env", "gtr/Points24-v0"])
    assert (cards.thought_coef, cards.format_reward, cards.format_penalty) == (0.5, 3.0, -2.0)
    assert (cards.updates, cards.eval_episodes) == (50, 128)


@pytest.mark.parametrize("unparsed_action", ["random", "penalty"])
def test_rollout_counts_answers_that_name_an_admissible_command(unparsed_action):
    """info["admissible"] marks the command played; the rollout reports whether the ANSWER named
    an admissible command (an unparsed answer did not, whatever random command stood in for it),
    an episode counts them, and report.admissible_share is their share of the episodes' steps.
    An environment without commands reports None and no share."""
    import gymnasium as gym

    from plumbing.report import admissible_share
    from rollout import Rollout
    runner = Rollout([gym.make("gtr/Household-v0")], seed=0, unparsed_action=unparsed_action)
    house = runner.envs[0].unwrapped
    house.max_steps = 30
    named = []
    for step in range(30):
        admissible = house.admissible()
        if step % 3 == 0:
            answer = format_answer("go", admissible[0])
        elif step % 3 == 1:
            answer = format_answer("go", next(c for c in house.actions if c not in admissible))
        else:
            answer = "no answer at all"
        named.append(step % 3 == 0)
        (result,) = runner.step([answer])
        assert result["admissible"] is named[-1]
    (episode,) = runner.episodes
    assert episode["length"] == 30 and episode["admissible_steps"] == 10
    assert admissible_share(runner.episodes, world=1) == pytest.approx(10 / 30)

    runner = Rollout([gym.make("gtr/NumberLine-v0")], seed=0)
    (result,) = runner.step(["no answer at all"])
    assert result["admissible"] is None
    assert math.isnan(admissible_share([{"length": 3, "success": False, "return": 0.0}], world=1))


def test_demonstrations_explore_with_admissible_commands():
    """The warm start's random moves on the household are admissible commands (the mistakes of
    an agent that copies from the list); on a card game any action, drawn as before."""
    env = HouseholdEnv(image_size=48)
    rng = np.random.default_rng(0)
    for seed in range(5):
        env.reset(seed=seed)
        for _ in range(10):
            action = random_move(env, rng)
            assert env.actions[action] in env.admissible()
            env.step(action)
    card = gym.make("gtr/NumberLine-v0").unwrapped
    drawn = int(np.random.default_rng(3).integers(len(card.actions)))
    assert random_move(card, np.random.default_rng(3)) == drawn
