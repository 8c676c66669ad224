"""NumberLine: move a current number to a target number, one step of +1 or -1 at a time.

Concept: the simplest of RL4VLM's gym_cards tasks (docs/ALGORITHM.md §5). The image shows two lines
of text, "Target: t" and "Current: c", with t != c in 0..max_position; the agent answers "+" or "-".
It tests whether the model reads two digits from a picture and compares them.

Rules (as in gym_cards):
- "+" adds 1, "-" subtracts 1; the number stays inside 0..max_position (a move past the end
  leaves it where it is).
- Reward +1 when the current number reaches the target (the episode terminates), -1 when a move
  did not bring it closer (away, or stuck at an end), otherwise 0.
- Truncated after 2 * max_position steps without reaching the target. This one is a time
  limit (the step count is not in the picture), so PPO bootstraps it from V of the final
  state, which the last move changed; unlike Points' length limit (points24.py), it never
  bootstraps a state only from itself.
- ``invalid_step()`` (the model's answer named no admissible action): reward -1, the number
  does not move, and the step counts toward truncation, i.e. exactly a wasted move.

Deviations from gym_cards, on purpose: randomness comes from ``self.np_random`` (the reference
used Python's global ``random``, so ``reset(seed=...)`` did not reproduce a state) and the start
always differs from the target (the reference only enforced it in ``__init__``). The text is
drawn in Pillow's default font, about 1/6 of the image high, with each digit centred in a cell
of a 4 x 4 grid, so that the tiny model, which sees the picture at 112 px, can read the digits.

Use::

    import gymnasium as gym, envs
    env = gym.make("gtr/NumberLine-v0").unwrapped
    obs, info = env.reset(seed=0)        # or options={"position": 1, "target": 4}
    text = env.prompt()                  # the instruction for the language model
    thoughts, action = env.expert()      # ("current 1, target 4, so I move up", 1)
    env.facts()                          # ["current 1", "target 4"]: what a grounded thought names
    obs, reward, terminated, truncated, info = env.step(env.parse(answer_text))
"""
from __future__ import annotations

from .answer import ANSWER_INSTRUCTION
from .base import VisualTextEnv, check_option_keys
from .drawing import draw_text


class NumberLineEnv(VisualTextEnv):
    """See the module docstring. Actions: 0 = "-", 1 = "+"."""

    actions = ["-", "+"]

    def __init__(self, max_position: int = 5, image_size: int = 300,
                 render_mode: str | None = None):
        super().__init__(image_size, render_mode)
        if isinstance(max_position, bool) or not isinstance(max_position, int) or max_position < 1:
            raise ValueError(f"max_position must be an integer >= 1, got {max_position!r}.")
        self.max_position = max_position
        self.position = self.target = self.steps = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = check_option_keys(options, {"position", "target"})
        if options:
            if set(options) != {"position", "target"}:
                raise ValueError('NumberLine options need both "position" and "target", '
                                 'e.g. {"position": 1, "target": 4}.')
            for key in ("position", "target"):
                value = options[key]
                if (isinstance(value, bool) or not isinstance(value, int)
                        or not 0 <= value <= self.max_position):
                    raise ValueError(f"{key} must be an integer in 0..{self.max_position}, "
                                     f"got {value!r}.")
            if options["position"] == options["target"]:
                raise ValueError("position must differ from target: "
                                 "the episode would be over before it starts.")
            self.position, self.target = options["position"], options["target"]
        else:
            self.target = int(self.np_random.integers(0, self.max_position + 1))
            # Start anywhere but on the target: draw among the other max_position numbers.
            start = int(self.np_random.integers(0, self.max_position))
            self.position = start + (start >= self.target)
        self.steps = 0
        return self._observation(), self._info()

    def step(self, action):
        move = 1 if self._check_action(action) == 1 else -1
        before = abs(self.position - self.target)
        self.position = min(max(self.position + move, 0), self.max_position)
        after = abs(self.position - self.target)
        if after == 0:
            reward = 1.0  # the target reached
        elif after < before:
            reward = 0.0
        else:
            reward = -1.0  # a move that did not get closer
        return self._finish_step(reward)

    def invalid_step(self):
        """An answer with no admissible action: -1, no move, and the step still counts."""
        return self._finish_step(-1.0)

    def _finish_step(self, reward: float):
        self.steps += 1
        terminated = self.position == self.target
        truncated = not terminated and self.steps >= 2 * self.max_position
        info = self._info()
        if terminated or truncated:
            info["success"] = terminated
        return self._observation(), reward, terminated, truncated, info

    def prompt(self) -> str:
        return (
            f"You are playing NumberLine. The image shows a target number and a current number, "
            f"both between 0 and {self.max_position}. Move the current number to the target: "
            f'"+" adds 1, "-" subtracts 1. {self._admissible_text()} {ANSWER_INSTRUCTION}'
        )

    def expert(self) -> tuple[str, int]:
        """The shortest way: move toward the target."""
        if self.position == self.target:
            raise RuntimeError("the episode is over (current equals target); call reset() first.")
        if self.position < self.target:
            return f"current {self.position}, target {self.target}, so I move up", 1
        return f"current {self.position}, target {self.target}, so I move down", 0

    def facts(self) -> list[str]:
        """The current and the target number, each with its label: the bare digits would not say
        which is which (docs/ALGORITHM.md §4.5)."""
        return [f"current {self.position}", f"target {self.target}"]

    def _info(self) -> dict:
        return {"position": self.position, "target": self.target, "steps": self.steps}

    def _draw(self, image) -> None:
        s = self.image_size
        size = s // 6  # the two lines fill the picture: digits stay legible at 56-112 px
        # Each digit is centred in one cell of a 4 x 4 grid (rows 1 and 3, last column): the tiny
        # VLM at 112 px makes one image token of each cell (2 x 2 patches of 14 px), so each
        # digit lies whole in one token.
        for row, label, value in ((0, "Target:", self.target), (2, "Current:", self.position)):
            middle = s * (row + 0.5) / 4
            draw_text(image, (s * 3 / 8, middle), label, size, center=True)
            draw_text(image, (s * 7 / 8, middle), str(value), size, center=True)
