"""Tests of gtr/ALFWorld-v0 (envs/alfworld_env.py), the optional adapter of the real games.

Without the alfworld package (and its game files) it must fail with one line that says what to
install and download. Its own logic (the shared command vocabulary, inadmissible commands,
rewards, the step limit, the picture, pickling by replay) is tested on a scripted stand-in for
TextWorld's engine, which answers like it: a state dict with the feedback, the admissible
commands and whether the game is won. The real games are played only where the package and
`alfworld-download`'s files are installed.
"""
import os
import pickle
import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs import alfworld_env
from envs.alfworld_env import ALFWorldEnv, missing_requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class State(dict):
    """TextWorld's GameState: a dict whose keys read as attributes too."""

    def __getattr__(self, attr):
        return self.get(attr)


class ScriptedEngine:
    """A game as {room: (feedback, {command: next room})}; the room "won" wins."""

    def load(self, game):
        self.game = game

    def reset(self):
        self.room = "start"
        return self._state("-= Welcome to TextWorld, ALFRED! =-\n\n" + self.game["start"][0]
                           + "\n\nYour task is to: put a mug in cabinet.")

    def step(self, command):
        self.room = self.game[self.room][1][command]
        return self._state(self.game[self.room][0]), 0, self.room == "won"

    def _state(self, feedback):
        return State(feedback=feedback, won=self.room == "won",
                     admissible_commands=sorted(self.game[self.room][1]))


GAME = {
    "start": ("You are in the middle of a room.",
              {"go to countertop 1": "counter", "look": "start"}),
    "counter": ("You arrive at countertop 1. On the countertop 1, you see a mug 1.",
                {"take mug 1 from countertop 1": "holding", "go to cabinet 1": "cabinet",
                 "look": "counter"}),
    "holding": ("You pick up the mug 1 from the countertop 1.",
                {"go to cabinet 1": "cabinet with mug", "look": "holding"}),
    "cabinet": ("You arrive at cabinet 1. On the cabinet 1, you see nothing.",
                {"go to countertop 1": "counter"}),
    "cabinet with mug": ("You arrive at cabinet 1.", {"put mug 1 in/on cabinet 1": "won"}),
    "won": ("You put the mug 1 in/on the cabinet 1.", {}),
}


@pytest.fixture
def scripted(monkeypatch):
    """ALFWorldEnv on the scripted engine, as if the package were installed."""
    monkeypatch.setattr(alfworld_env, "missing_requirement", lambda split="train": None)
    monkeypatch.setattr(ALFWorldEnv, "_new_engine", lambda self: ScriptedEngine())

    def make(**kwargs):
        env = ALFWorldEnv(games=[GAME], image_size=96, **kwargs)
        env.reset(seed=0)
        return env

    return make


def play(env, command):
    return env.step(alfworld_env.VOCABULARY.index(command))


@pytest.mark.slow
def test_without_the_package_one_line_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "alfworld", None)  # importing it now fails, installed or not
    with pytest.raises(ImportError) as error:
        gym.make("gtr/ALFWorld-v0")
    message = str(error.value)
    assert ("\n" not in message and "pip install alfworld" in message
            and "alfworld-download" in message)
    assert "gtr/ALFWorld-v0" in gym.registry and "gtr/ALFWorld-v0" not in envs.ENV_IDS

    if missing_requirement() is None:
        return  # with the package and its data here, train.py would run, not stop
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"),
                             "--env", "gtr/ALFWorld-v0", "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip() and "arning" not in line]
    assert result.returncode != 0 and lines == [missing_requirement()], result.stderr[-2000:]


def test_plays_through_the_engine(scripted):
    env = scripted()
    assert env.goal == "put a mug in cabinet" and env.feedback == "You are in the middle of a room."
    assert '"go to countertop 1", "look"' in env.prompt() and env.goal in env.prompt()
    _, reward, terminated, _, info = play(env, "go to countertop 1")
    assert (reward, terminated, info["steps"]) == (0.0, False, 1)
    assert "take mug 1 from countertop 1" in info["admissible_commands"]
    before = env._observation()
    # already there: inadmissible
    _, reward, terminated, truncated, info = play(env, "go to countertop 1")
    assert ((reward, terminated, truncated, info["feedback"])
            == (-1.0, False, False, "Nothing happens."))
    assert env.step(alfworld_env.MAX_COMMANDS - 1)[1] == -1.0  # an id no command has yet
    assert env.invalid_step()[1] == -1.0 and env.steps == 4
    play(env, "take mug 1 from countertop 1")
    after = env._observation()
    assert not np.array_equal(before, after) and after.min() < 60  # the feedback is drawn
    play(env, "go to cabinet 1")
    _, reward, terminated, truncated, info = play(env, "put mug 1 in/on cabinet 1")
    assert (reward, terminated, truncated, info["success"]) == (50.0, True, False, True)


def test_one_vocabulary_for_every_environment(scripted):
    first, second = scripted(), scripted()
    command = "take mug 1 from countertop 1"
    play(first, "go to countertop 1")  # the state that shows it adds the command to the vocabulary
    assert first.actions is second.actions and command in second.actions
    answer = envs.format_answer("the mug is here", command)
    assert first.parse(answer) == second.parse(answer) == alfworld_env.VOCABULARY.index(command)
    assert second.step(second.parse(answer))[1] == -1.0  # admissible for the first, not the second
    assert first.step(first.parse(answer))[4]["feedback"].startswith("You pick up")


def test_time_limit_and_check_env(scripted):
    env = scripted(max_steps=3)
    outcomes = [play(env, "look")[2:4] for _ in range(3)]
    assert outcomes == [(False, False), (False, False), (False, True)]
    # with a spec, as check_env wants
    env = gym.make("gtr/ALFWorld-v0", games=[GAME], image_size=96).unwrapped
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env)
    assert not caught, [str(w.message) for w in caught]
    with pytest.raises(ValueError, match="game must be an index"):
        env.reset(options={"game": 1})


def test_pickling_replays_the_episode(scripted):
    env = scripted()
    play(env, "go to countertop 1")
    play(env, "take mug 1 from countertop 1")
    copy = pickle.loads(pickle.dumps(env))
    assert ((copy.steps, copy.feedback, copy.admissible_commands)
            == (env.steps, env.feedback, env.admissible_commands))
    assert np.array_equal(copy._observation(), env._observation())
    play(copy, "go to cabinet 1")
    assert play(copy, "put mug 1 in/on cabinet 1")[1] == 50.0


@pytest.mark.skipif(missing_requirement("valid_seen") is not None,
                    reason="needs the alfworld package (TextWorld's PDDL engine, Fast Downward, "
                           "jericho and spaCy, which build from source) and alfworld-download's "
                           "games: pip install alfworld; alfworld-download")
def test_the_planner_solves_a_real_game():
    env = ALFWorldEnv(split="valid_seen", image_size=96)
    env.reset(seed=0)
    total, done = 0.0, False
    while not done:
        thoughts, action = env.expert()
        assert env.parse(envs.format_answer(thoughts, env.actions[action])) == action
        _, reward, terminated, truncated, info = env.step(action)
        total, done = total + reward, terminated or truncated
    assert info["success"] and total == 50.0
