"""The visual environments (docs/ALGORITHM.md §5): RL4VLM's four card games and Household,
rebuilt here.

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
NumberLine also ``max_position`` (default 5). The answer format helpers (answer.py) and the
thought-collapse measures (thoughts.py) are re-exported here. ``gtr/ALFWorld-v0`` is registered
too; it needs the optional ``alfworld`` package and its data (alfworld_env.py).
"""
import gymnasium

from . import alfworld_env
from .alfworld_env import ALFWorldEnv
from .answer import ANSWER_OPENING, action_span, extract_thoughts, format_answer, parse_action
from .blackjack import BlackjackEnv
from .ez_points import EZPointsEnv
from .household import HouseholdEnv
from .number_line import NumberLineEnv
from .points24 import Points24Env
from .thoughts import thought_diversity, thought_grounding

ENV_CLASSES = {
    "gtr/NumberLine-v0": NumberLineEnv,
    "gtr/EZPoints-v0": EZPointsEnv,
    "gtr/Points24-v0": Points24Env,
    "gtr/Blackjack-v0": BlackjackEnv,
    "gtr/Household-v0": HouseholdEnv,
}
ENV_IDS = list(ENV_CLASSES)  # the bundled ones: they run with nothing more installed

# The tiny model's tokenizer is trained on the prompts of one family of environments
# (plumbing/tinyvlm.py). Families keep it short for each, and keep the card games' tiny model the
# one their published results used: a new family never changes another family's model.
FAMILIES = {"cards": ["gtr/NumberLine-v0", "gtr/EZPoints-v0", "gtr/Points24-v0",
                      "gtr/Blackjack-v0"],
            "household": ["gtr/Household-v0"]}
FAMILY_OF = ({env_id: family for family, ids in FAMILIES.items() for env_id in ids}
             | {"gtr/ALFWorld-v0": "household"})

# Where the paper's hyperparameters differ for ALFWorld (lambda 0.2; a format reward of +5 / -5 in
# the reference's ALFWorld runs against +3 / -2 on the cards), train.py uses these defaults for
# the flags that are not given on the command line. The bundled household also runs 40 updates
# and evaluates 32 episodes, not 50 and 128 (an episode lasts up to 50 steps): a default run with
# its 800-step warm start then fits 25 minutes on 2 CPU cores.
ALFWORLD_SETTINGS = {"thought_coef": 0.2, "format_reward": 5.0, "format_penalty": -5.0}
ENV_DEFAULTS = {"gtr/NumberLine-v0": {"warmup_target_loss": 0.05},
                "gtr/ALFWorld-v0": ALFWORLD_SETTINGS,
                "gtr/Household-v0": ALFWORLD_SETTINGS | {"updates": 40, "eval_episodes": 32}}

# What an environment needs beyond requirements.txt: a function giving None, or one line saying
# what to install (train.py checks it before anything runs).
REQUIREMENTS = {"gtr/ALFWorld-v0": alfworld_env.missing_requirement}

for _env_id, _cls in ENV_CLASSES.items() | {("gtr/ALFWorld-v0", ALFWorldEnv)}:
    if _env_id not in gymnasium.registry:  # importing twice (e.g. a reload) must not warn
        gymnasium.register(id=_env_id, entry_point=_cls)

__all__ = ["ENV_IDS", "ENV_CLASSES", "FAMILIES", "FAMILY_OF", "ENV_DEFAULTS", "NumberLineEnv",
           "EZPointsEnv", "Points24Env", "BlackjackEnv", "HouseholdEnv", "ALFWorldEnv",
           "REQUIREMENTS", "ANSWER_OPENING", "format_answer", "parse_action", "extract_thoughts",
           "action_span", "thought_grounding", "thought_diversity"]
