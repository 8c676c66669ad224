"""What every environment here shares: ``VisualTextEnv`` and the check of ``reset``'s options.

Concept: every environment is an image-in, text-out game (docs/ALGORITHM.md §1, §5). The
observation is an RGB picture of ``image_size`` pixels, and the agent is a language model that
answers in the format of answer.py. The base class gives each game its observation and action
spaces, the ``rgb_array`` render mode, its ``actions`` strings, ``parse`` and ``read``; a game
adds its rules, its picture (``_draw``), its prompt, its expert and its ``facts()``.

Use: ``class Game(VisualTextEnv)`` with ``actions = ["-", "+"]`` and ``_draw``, ``facts``,
``reset`` and ``step`` written; ``Game().parse('{"thoughts": "", "action": "+"}')`` gives ``1``.
"""
from __future__ import annotations

import gymnasium as gym
import numpy as np
from PIL import Image

from .answer import extract_thoughts, format_answer, parse_action
from .drawing import WHITE


def check_option_keys(options: dict | None, allowed: set[str]) -> dict:
    """``reset(options=...)``: None or {} mean a random state; unknown keys are a mistake."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ValueError(f"options must be a dict, got {type(options).__name__}.")
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)}; this environment accepts "
                         f"{sorted(allowed)}.")
    return options


class VisualTextEnv(gym.Env):
    """What every game here shares: an RGB observation of ``image_size`` pixels, the
    ``rgb_array`` render mode, the ``actions`` strings and ``parse``.

    Subclasses set ``actions`` and implement ``_draw(image)`` (a white RGB Pillow image) and
    ``facts()``.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}
    actions: list[str] = []
    # The action space's size when not len(actions) (ALFWorld's growing vocabulary).
    action_count: int | None = None

    def __init__(self, image_size: int = 300, render_mode: str | None = None):
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 32:
            raise ValueError(f"image_size must be an integer >= 32 (pixels), got {image_size!r}.")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}.")
        self.image_size = image_size
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
        self.action_space = gym.spaces.Discrete(self.action_count or len(self.actions))

    def parse(self, text: str) -> int | None:
        """Action id named in a model's answer, or None (see ``parse_action``)."""
        return parse_action(text, self.actions)

    def read(self, text: str) -> tuple[str | None, int | None]:
        """(thoughts, action id) of a model's answer, each None where it has none: the answer
        parses when both are there (docs/ALGORITHM.md §3)."""
        return extract_thoughts(text), self.parse(text)

    def answer(self, thoughts: str, action: int) -> str:
        """The answer that names action id `action` with these thoughts, in the format ``read``
        reads (an expert's, or the teacher's thoughts with the agent's action, §4.2)."""
        return format_answer(thoughts, self.actions[action])

    def facts(self) -> list[str]:
        """The phrases a thought grounded in the current state names (docs/ALGORITHM.md §4.5):
        what the picture shows, in the words of the game's expert, whose thoughts name them
        all."""
        raise NotImplementedError

    def render(self):
        """The current frame as an RGB array in ``rgb_array`` mode (None without a render
        mode)."""
        return self._observation() if self.render_mode == "rgb_array" else None

    def _observation(self) -> np.ndarray:
        image = Image.new("RGB", (self.image_size, self.image_size), WHITE)
        self._draw(image)
        return np.asarray(image, dtype=np.uint8)

    def _draw(self, image: Image.Image) -> None:
        raise NotImplementedError

    def _check_action(self, action) -> int:
        if not self.action_space.contains(action):
            raise ValueError(f"action must be an id in 0..{len(self.actions) - 1}, "
                             f"got {action!r}.")
        return int(action)

    def _admissible_text(self) -> str:
        return "Admissible actions: " + ", ".join(f'"{a}"' for a in self.actions) + "."
