"""EZPoints: make 12 from two cards with + or *, one token per step.

Concept: the easy version of Points24 in RL4VLM's gym_cards (docs/ALGORITHM.md §5). The image shows
two cards (J, Q, K count 10) and the formula so far; actions are '1'..'10', '+', '*' and '='. Every
deal is solvable: as in gym_cards, the first card is 2..K and the second card completes it to 12, by
'*' (half the time, when the first value divides 12) or by '+'; the two are then swapped half the
time.

Rules: those of Points24 (see points24.py, which holds the shared ``PointsEnv``) with target
12, both cards, and a formula length limit of 5: a step that starts with a formula longer than
5 tokens ends the episode with -1 (``terminated``, where gym_cards says ``truncated``: see
points24.py). An unavailable number costs -1 and appends a blank without
ending the episode; '=' gives +10 for a right formula with both cards, else -1, and ends it.
``invalid_step()`` is an unavailable number. Same deviations as Points24 (exact evaluation,
``self.np_random`` for every draw).

Use::

    import gymnasium as gym, envs
    env = gym.make("gtr/EZPoints-v0").unwrapped
    obs, info = env.reset(options={"cards": [3, 4]})
    env.expert()        # ("cards 3, 4; 3 * 4 = 12, so next is 3", 2)
"""
from __future__ import annotations

from .cards import card_value
from .points24 import PointsEnv


class EZPointsEnv(PointsEnv):
    """Two cards, target 12, '+' and '*' only, formulas up to 5 tokens."""

    title = "EZPoints"
    target = 12
    n_cards = 2
    max_len = 5
    operators = ["+", "*"]
    operators_text = "+ or *"
    cards_height = 0.66  # two big cards, a line of formula below

    def _deal(self) -> list[int]:
        first = int(self.np_random.integers(2, 14))  # 2..K, as gym_cards
        value = card_value(first)
        if value in (2, 3, 4, 6) and self.np_random.random() < 0.5:
            second = 12 // value
        else:
            second = 12 - value
        return [first, second] if self.np_random.random() < 0.5 else [second, first]
