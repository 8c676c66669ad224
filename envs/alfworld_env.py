"""ALFWorld itself, through its text engine: the game's observation drawn as the image, its
admissible commands in the prompt. An optional dependency.

Concept: the paper's second benchmark (docs/ALGORITHM.md §5). ``gtr/Household-v0``
(household.py) has its shape and runs anywhere; this adapter plays the real games where the
``alfworld`` package (with TextWorld's PDDL engine) and its game files are installed:

    pip install alfworld     # TextWorld and Fast Downward come with it
    alfworld-download        # the game files, into $ALFWORLD_DATA (default ~/.cache/alfworld)

Without them, ``gym.make("gtr/ALFWorld-v0")`` (and ``train.py --env gtr/ALFWorld-v0``, before
anything runs) stops with one line that says what to install and download.

How it plays: each reset picks a game with ``np_random`` among ``games`` (paths of ALFWorld's
``game.tw-pddl`` files or their loaded JSON), or among the solvable games of ``split`` in
$ALFWORLD_DATA as ALFWorld's ``AlfredTWEnv`` collects them, and plays it with TextWorld's PDDL
engine, names demangled to "mug 1" as ALFWorld does. The observation is the text engine's last
feedback, drawn as a picture. ALFWorld's THOR frames are not used: they need its 3-D simulator
(ai2thor and a display). The prompt holds the goal, the feedback and the admissible commands.

Actions: ALFWorld's commands name each game's own objects, so no fixed list covers every game.
``actions`` is a vocabulary shared by every ALFWorldEnv of the process: a state's admissible
commands join it when the state is shown, and an id keeps its meaning for the life of the
process (train.py's teacher reads one environment's list for all of them). The action space is
``Discrete(MAX_COMMANDS)``; an id not yet in the vocabulary, or a command not admissible now, is
inadmissible.

Rewards and episode end: those of Household and of the reference (RL4VLM's ``compute_reward``):
+50 when the game is won (terminates), -1 for an inadmissible command (nothing happens, the
step counts; ``invalid_step()`` too), truncated after 50 steps; each step's info holds
``admissible``, as Household's. train.py's defaults for it:
lambda 0.2, format reward +5 / -5 (envs.ENV_DEFAULTS).

Expert: ALFWorld's planner, TextWorld's PDDL replanning from the current state (Fast Downward);
exact, and slower than Household's (ALFWorld's config calls it slow for real-time use).

Checkpoints: TextWorld's engine holds a compiled planner and cannot be pickled, so pickling keeps
the game and the commands played in the episode, and unpickling replays them.

Use::

    import gymnasium as gym, envs
    env = gym.make("gtr/ALFWorld-v0", split="train").unwrapped    # or games=[path or JSON, ...]
    obs, info = env.reset(seed=0)
    env.prompt(); thoughts, action = env.expert(); env.step(action)
"""
from __future__ import annotations

import json
import os
import re
from functools import lru_cache

from .answer import ANSWER_INSTRUCTION
from .base import VisualTextEnv, check_option_keys
from .drawing import INK, draw_text, wrap_words

MAX_COMMANDS = 65536
INSTALL = ("gtr/ALFWorld-v0 needs the alfworld package and its game files: "
           "pip install alfworld, then "
           "alfworld-download (into $ALFWORLD_DATA, default ~/.cache/alfworld)")

# Every ALFWorldEnv of the process shares one vocabulary, so an action id means one command
# whichever environment it came from.
VOCABULARY: list[str] = []
_INDEX: dict[str, int] = {}


def game_folder(split: str) -> str:
    return os.path.join(os.path.expanduser(os.path.expandvars(
                            os.environ.get("ALFWORLD_DATA", "~/.cache/alfworld"))),
                        "json_2.1.1", split)


def missing_requirement(split: str | None = "train") -> str | None:
    """None when the alfworld package, TextWorld's PDDL engine and (unless split is None) the
    split's game files are there; else one line saying what to install and download."""
    try:
        import alfworld.agents.environment.alfred_tw_env  # noqa: F401  (the demangler)
        import fast_downward  # noqa: F401  (TextWorld's PDDL engine needs it)
        import textworld.envs.pddl  # noqa: F401
    except ImportError:
        return INSTALL
    if split is not None and not solvable_games(game_folder(split)):
        return f"no ALFWorld games in {game_folder(split)}; {INSTALL}"
    return None


@lru_cache(maxsize=None)
def solvable_games(folder: str) -> tuple[str, ...]:
    """ALFWorld's solvable games under a folder, as AlfredTWEnv.collect_game_files finds them."""
    games = []
    for root, _, files in sorted(os.walk(folder)):
        if ("traj_data.json" in files and "game.tw-pddl" in files and "movable" not in root
                and "Sliced" not in root):
            path = os.path.join(root, "game.tw-pddl")
            with open(path) as f:
                if json.load(f).get("solvable"):
                    games.append(path)
    return tuple(games)


def register(commands) -> None:
    for command in commands:
        if command not in _INDEX:
            if len(VOCABULARY) >= MAX_COMMANDS:
                raise RuntimeError(f"more than {MAX_COMMANDS} distinct ALFWorld commands in one "
                                   "process; "
                                   "raise envs.alfworld_env.MAX_COMMANDS.")
            _INDEX[command] = len(VOCABULARY)
            VOCABULARY.append(command)


class ALFWorldEnv(VisualTextEnv):
    """See the module docstring."""

    actions = VOCABULARY
    action_count = MAX_COMMANDS
    success_reward = 50.0
    inadmissible_penalty = -1.0

    def __init__(self, games=None, split: str = "train", max_steps: int = 50, image_size: int = 300,
                 render_mode: str | None = None):
        missing = missing_requirement(split if games is None else None)
        if missing:
            raise ImportError(missing)
        super().__init__(image_size, render_mode)
        games = solvable_games(game_folder(split)) if games is None else games
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps must be an integer >= 1, got {max_steps!r}.")
        self.games, self.max_steps = list(games), max_steps
        self.game_index, self.played = 0, []
        self.goal = self.feedback = ""
        self.admissible_commands: list[str] = []
        self.won, self.steps = False, 0
        self._engine = None

    def _new_engine(self):
        import textworld
        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler
        from textworld.envs.pddl import PddlEnv
        return AlfredDemangler(PddlEnv(textworld.EnvInfos(admissible_commands=True, won=True)))

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = check_option_keys(options, {"game"})
        index = options.get("game", None)
        if index is None:
            index = int(self.np_random.integers(len(self.games)))
        elif (isinstance(index, bool) or not isinstance(index, int)
              or not 0 <= index < len(self.games)):
            raise ValueError(f"game must be an index in 0..{len(self.games) - 1}, got {index!r}.")
        self._start(index)
        return self._observation(), self._info()

    def _start(self, index: int) -> None:
        self.game_index, self.played, self.steps = index, [], 0
        self._engine = self._engine or self._new_engine()
        self._engine.load(self.games[index])
        state = self._engine.reset()
        match = re.search(r"Your task is to: (.*?)\.?\s*$", state.feedback)
        self.goal = match.group(1) if match else ""
        # The intro's welcome banner and task line are not the room: the room is what remains.
        self._read(state, state.feedback.split("\n\n")[1] if "\n\n" in state.feedback
                   else state.feedback)

    def _read(self, state, feedback: str) -> None:
        self.feedback, self.won = feedback.strip(), bool(state["won"])
        self.admissible_commands = list(state["admissible_commands"])
        register(self.admissible_commands)

    def step(self, action):
        action = self._check_action(action)
        command = VOCABULARY[action] if action < len(VOCABULARY) else None
        if command not in self.admissible_commands:
            return self.invalid_step()
        state, _, _ = self._engine.step(command)
        self.played.append(command)
        self._read(state, state.feedback)
        return self._finish_step(self.success_reward if self.won else 0.0)

    def invalid_step(self):
        """An inadmissible command, or an answer that names none: -1, nothing changes, the step
        counts."""
        self.feedback = "Nothing happens."
        return self._finish_step(self.inadmissible_penalty, admissible=False)

    def facts(self) -> list[str]:
        """The object the goal names ("put a clean mug in cabinet": mug), which a thought about this
        task names (docs/ALGORITHM.md §4.5); the whole goal where no article introduces one."""
        match = re.search(r"\b(?:a|an|some|two|the)\s+(?:clean |hot |cool |heated |cooled )?(\w+)",
                          self.goal)
        return [match.group(1) if match else self.goal or "task"]

    def _finish_step(self, reward: float, admissible: bool = True):
        """Count the step; info["admissible"] says whether the command played was admissible,
        the share a run logs as `admissible` (rollout.Rollout)."""
        self.steps += 1
        truncated = not self.won and self.steps >= self.max_steps
        info = {**self._info(), "admissible": admissible}
        if self.won or truncated:
            info["success"] = self.won
        return self._observation(), reward, self.won, truncated, info

    def _info(self) -> dict:
        return {"goal": self.goal, "game": self.game_index, "steps": self.steps,
                "feedback": self.feedback,
                "admissible_commands": list(self.admissible_commands)}

    def prompt(self) -> str:
        commands = ", ".join(f'"{c}"' for c in self.admissible_commands)
        return (f"You are in a household; the image shows what you observe. "
                f"Your task is to: {self.goal}. "
                f"{self.feedback} Admissible actions: {commands}. {ANSWER_INSTRUCTION}")

    def expert(self) -> tuple[str, int]:
        """The next command of ALFWorld's planner from the current state."""
        if self.won or self.steps >= self.max_steps:
            raise RuntimeError("the episode is over; call reset() first.")
        # TextWorld's PddlEnv replans from its current state with Fast Downward; its
        # `policy_commands` info does the same, but at every step, which RL does not need.
        engine = self._engine.unwrapped
        plan = engine._pddl_state.replan(engine._entity_infos)
        if not plan or plan[0] not in self.admissible_commands:
            raise RuntimeError(f"ALFWorld's planner found no admissible next command "
                               f"(plan: {plan[:3]}).")
        return f"my plan from here: {', '.join(plan[:3])}", _INDEX[plan[0]]

    def _draw(self, image) -> None:
        s, words = self.image_size, self.feedback.split()
        # The largest font whose wrapped lines fit the picture (the smallest legible one if none
        # does).
        size = next((size for size in range(max(6, s // 8), 6, -1)
                     if len(wrap_words(words, size, s * 0.92)) * size * 1.25 <= s * 0.92), 6)
        for i, line in enumerate(wrap_words(words, size, s * 0.92)):
            draw_text(image, (s * 0.04, s * 0.04 + i * size * 1.25), line, size, INK)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_engine"] = None  # replayed in __setstate__
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.played or self.goal:
            played, steps, feedback = self.played, self.steps, self.feedback
            self._start(self.game_index)
            for command in played:
                state, _, _ = self._engine.step(command)
                self._read(state, state.feedback)
            self.played, self.steps, self.feedback = played, steps, feedback
