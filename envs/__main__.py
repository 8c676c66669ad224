"""Render one sample frame of every environment as a PNG: ``python -m envs [folder]`` (default
docs/).

Useful to look at what the agent sees after changing the drawing code (docs/ALGORITHM.md §5).
"""
import sys
from pathlib import Path

from PIL import Image

from . import BlackjackEnv, EZPointsEnv, HouseholdEnv, NumberLineEnv, Points24Env


def sample_frames(image_size: int = 300) -> dict:
    """{name: RGB array} for a typical mid-episode state of each environment."""
    frames = {}
    env = NumberLineEnv(image_size=image_size)
    frames["NumberLine"] = env.reset(options={"position": 2, "target": 4})[0]
    env = EZPointsEnv(image_size=image_size)
    env.reset(seed=0, options={"cards": [12, 2]})
    env.step(env.actions.index("10"))
    frames["EZPoints"] = env.step(env.actions.index("+"))[0]
    env = Points24Env(image_size=image_size)
    env.reset(seed=0, options={"cards": [1, 11, 8, 3]})
    for token in ["(", "10", "-", "8", ")", "*"]:
        obs = env.step(env.actions.index(token))[0]
    frames["Points24"] = obs
    env = BlackjackEnv(image_size=image_size)
    frames["Blackjack"] = env.reset(seed=0, options={"player": [1, 7, 3], "dealer": [13, 5]})[0]
    env = HouseholdEnv(image_size=image_size)
    env.reset(seed=0, options={"task": {"type": "pick_heat_then_place_in_recep", "object": "potato",
                                        "target": "table 1"},
                               "objects": {"apple 1": "countertop 1", "potato 1": "fridge 1",
                                           "mug 1": "table 1", "book 1": "desk 1",
                                           "cd 1": "drawer 1", "cd 2": "countertop 1"}})
    for command in ["go to fridge 1", "open fridge 1", "take potato 1 from fridge 1",
                    "go to microwave 1", "heat potato 1 with microwave 1"]:
        obs = env.step(env.actions.index(command))[0]
    frames["Household"] = obs
    return frames


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "docs")
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in sample_frames().items():
        Image.fromarray(frame).save(folder / f"{name}.png")
        print(folder / f"{name}.png")
