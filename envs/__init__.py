"""The four visual card games of RL4VLM's gym_cards (docs/ALGORITHM.md §5), rebuilt for this project.

Importing the package registers them with gymnasium:

    import gymnasium as gym
    import envs
    env = gym.make("gtr/Points24-v0", image_size=112)
    obs, info = env.reset(seed=0)
    game = env.unwrapped            # the text side lives on the unwrapped env:
    game.prompt()                   #   instruction for the language model
    game.parse(answer_text)         #   action id named in a JSON answer, or None
    game.expert()                   #   (thoughts, action id) of a good move
    game.invalid_step()             #   the step taken when an answer names no action
    game.facts()                    #   what a thought grounded in this state names

Every environment takes ``image_size`` (default 300) and ``render_mode`` (None or "rgb_array");
NumberLine also ``max_position`` (default 5). The answer format helpers and the thought-collapse
measures are re-exported here.
"""
import gymnasium

from .blackjack import BlackjackEnv
from .common import action_span, extract_thoughts, format_answer, parse_action, thought_diversity, thought_grounding
from .ez_points import EZPointsEnv
from .number_line import NumberLineEnv
from .points24 import Points24Env

ENV_CLASSES = {
    "gtr/NumberLine-v0": NumberLineEnv,
    "gtr/EZPoints-v0": EZPointsEnv,
    "gtr/Points24-v0": Points24Env,
    "gtr/Blackjack-v0": BlackjackEnv,
}
ENV_IDS = list(ENV_CLASSES)

for _env_id, _cls in ENV_CLASSES.items():
    if _env_id not in gymnasium.registry:  # importing twice (e.g. a reload) must not warn
        gymnasium.register(id=_env_id, entry_point=_cls)

__all__ = ["ENV_IDS", "ENV_CLASSES", "NumberLineEnv", "EZPointsEnv", "Points24Env", "BlackjackEnv",
           "format_answer", "parse_action", "extract_thoughts", "action_span", "thought_grounding", "thought_diversity"]
