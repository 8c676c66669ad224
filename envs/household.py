"""Household: ALFWorld's six household tasks in one small room seen from above, text commands in.

Concept: the shape of ALFWorld, the paper's second benchmark (docs/ALGORITHM.md §5), without its
downloaded game files and 3-D simulator: long horizons, text commands whose admissible set changes
with the state, and a sparse success signal. The image is the room from above, drawn with Pillow:
eight pieces of furniture (the receptacles) in the cells of a 3 x 3 grid, the objects that can be
seen in or on them, the agent (a blue frame around the receptacle it stands at, a blue dot in the
middle of the room at the start) and, in the middle cell, what it holds. The prompt gives the goal,
the feedback of the last command and the commands that are admissible now.

The room (fixed, so that the action space is a fixed ``Discrete`` over every command of it):
- receptacles ``fridge 1``, ``microwave 1``, ``sink 1``, ``cabinet 1``, ``drawer 1``,
  ``countertop 1``, ``table 1``, ``desk 1`` (the desk holds ``desklamp 1``); the fridge,
  microwave, cabinet and drawer open and close and start closed, and what is inside a closed
  one is neither drawn nor listed;
- objects ``apple 1``, ``potato 1``, ``mug 1``, ``book 1``, ``cd 1``, ``cd 2``.
A layout is where each receptacle stands (a permutation of the grid's eight outer cells) and
where each object starts; a task is one of ALFWorld's six types, given as a text goal:

| type (ALFWorld's name) | goal, e.g. | objects |
|---|---|---|
| pick_and_place_simple | put a mug in the cabinet | any |
| look_at_obj_in_light | look at a book under the desklamp | book, cd, mug |
| pick_clean_then_place_in_recep | put a clean mug on the table | apple, potato, mug |
| pick_heat_then_place_in_recep | put a hot potato on the countertop | apple, potato, mug |
| pick_cool_then_place_in_recep | put a cool apple in the drawer | apple, potato, mug |
| pick_two_obj_and_place | put two cds in the cabinet | cd |

Places are the cabinet, drawer, countertop, table and desk. A goal counts any object of its
kind ("a mug": either mug would do). Looking at an object in the light means holding it at the
desk with the lamp on.

Commands, ALFWorld's wording: ``go to R``, ``open R``, ``close R``, ``take O from R``,
``put O in/on R`` (ALFWorld writes "in/on" literally), ``clean O with sink 1``,
``heat O with microwave 1``, ``cool O with fridge 1`` (for the apple, potato and mug),
``use desklamp 1`` (switches it on or off), ``examine O``, ``inventory``, ``look``; 130 in
all. Admissible now: ``go to`` any other receptacle; ``open`` / ``close`` the one the agent is
at; ``take`` a visible object there with empty hands (one object at a time, as in ALFWorld);
``put`` the held object there (an openable receptacle must be open, for ``take`` too); the
appliance commands with the right object in hand at that appliance; ``use desklamp 1`` at the
desk; ``examine`` the held object or one visible where the agent is; ``inventory`` and ``look``
always. Heating makes an object hot and no longer cool, cooling the reverse; cleaning lasts.

Rewards and episode end (the reference's ALFWorld setup, RL4VLM's ``alf_utils.compute_reward``
and its ALFWorld config):
- +50 on the step that meets the goal; the episode terminates (the reference: 50 x won);
- -1 for an inadmissible command, which changes nothing but the step count (the reference: -1
  for an illegal action); ``invalid_step()``, an answer that names no command, is the same;
- 0 otherwise; truncated after 50 steps (the reference's ``max_nb_steps_per_episode``: 50), a
  time limit that PPO bootstraps.
Each step's info holds ``admissible``, whether the command played was admissible: a run logs
the share of answers that named an admissible command (``admissible`` in metrics.jsonl).
Deliberately left out: the reference also adds ALFWorld's ``goal_condition_success_rate`` (the
fraction of the goal's conditions that hold, 0..1) to EVERY step's reward. That pays for being
in a state, not for reaching it, so an agent that holds a half-done goal is paid each step it
does not finish; this environment keeps the success signal sparse: only reaching the goal pays.

Randomness only from ``self.np_random``: the task (type, then object kind, then place), the
cells, then each object's start (never, for an object of the goal's kind, the goal's place).
``reset(options=...)`` fixes any of ``{"task": {"type": ..., "object": ..., "target": ...},
"cells": [8 receptacles], "objects": {object: receptacle}}``; the rest is drawn.

Expert: a planner whose every choice is in the text the model reads (the goal, the last command's
feedback, the admissible commands), so that a policy without memory can imitate it, as
ALFWorld's text agents search. It searches the receptacles in one fixed order (``SEARCH_ORDER``):
where the feedback lists an object of the goal's kind (not one that already counts) it takes it;
a closed receptacle it opens; otherwise it goes to the receptacle after the one it is at ("the
cabinet 1 holds no mug, so I go to the drawer 1"). With the object in hand it cleans, heats or
cools it at the appliance, and carries it to the place (opening it if closed) or, for the light
task, to the desk and switches the lamp on. Something else in hand is put down first. It never
reads the picture, which is left for RL to learn to use (a policy that sees where the object is
can cut the search short). It solves every deal within the step limit (tests/test_household.py
plays it on 1000 deals: 12.1 steps on average, 23 at most).

Use::

    import gymnasium as gym, envs
    env = gym.make("gtr/Household-v0").unwrapped
    obs, info = env.reset(seed=0, options={"task": {"type": "pick_clean_then_place_in_recep",
                                                    "object": "mug", "target": "cabinet 1"}})
    env.goal                      # "put a clean mug in the cabinet"
    env.admissible()              # ["go to fridge 1", ..., "inventory", "look"]
    thoughts, action = env.expert()
    obs, reward, terminated, truncated, info = env.step(action)
"""
from __future__ import annotations

from PIL import ImageDraw

from .answer import ANSWER_INSTRUCTION
from .base import VisualTextEnv, check_option_keys
from .drawing import INK, draw_text

RECEPTACLES = ["fridge 1", "microwave 1", "sink 1", "cabinet 1", "drawer 1", "countertop 1",
               "table 1", "desk 1"]
OPENABLE = ("fridge 1", "microwave 1", "cabinet 1", "drawer 1")
SEARCH_ORDER = RECEPTACLES  # the expert's search: from each receptacle to the next, cyclic
PLACES = ["cabinet 1", "drawer 1", "countertop 1", "table 1", "desk 1"]
# "in the ..."; the others "on the ..."
INSIDE = ("fridge 1", "microwave 1", "sink 1", "cabinet 1", "drawer 1")
OBJECTS = ["apple 1", "potato 1", "mug 1", "book 1", "cd 1", "cd 2"]
LAMP, DESK = "desklamp 1", "desk 1"
FOOD_AND_DISHES = ("apple", "potato", "mug")
# The appliance of each treatment, and the state it gives an object.
TREATMENTS = {"clean": ("sink 1", "clean"), "heat": ("microwave 1", "hot"),
              "cool": ("fridge 1", "cool")}
OPPOSITE = {"hot": "cool", "cool": "hot"}  # heating undoes cooling and the reverse; cleaning lasts

# ALFWorld's task types: (objects they take, the state a placed object needs, how many).
TASKS = {
    "pick_and_place_simple": (("apple", "potato", "mug", "book", "cd"), None, 1),
    "look_at_obj_in_light": (("book", "cd", "mug"), None, 1),
    "pick_clean_then_place_in_recep": (FOOD_AND_DISHES, "clean", 1),
    "pick_heat_then_place_in_recep": (FOOD_AND_DISHES, "hot", 1),
    "pick_cool_then_place_in_recep": (FOOD_AND_DISHES, "cool", 1),
    "pick_two_obj_and_place": (("cd",), None, 2),
}
TASK_TYPES = list(TASKS)
LOOK = "look_at_obj_in_light"

# The picture: a colour per kind of furniture and object, and rings of a colour per state.
FURNITURE_COLORS = {"fridge": (190, 225, 245), "microwave": (175, 175, 180),
                    "sink": (140, 190, 235), "cabinet": (215, 175, 120),
                    "drawer": (190, 150, 105), "countertop": (215, 215, 200),
                    "table": (165, 115, 65), "desk": (130, 160, 110)}
OBJECT_COLORS = {"apple": (220, 30, 30), "potato": (150, 100, 40), "mug": (40, 80, 200),
                 "book": (30, 150, 60), "cd": (190, 190, 200)}
AGENT_BLUE = (0, 90, 255)
CELL_PAD = 0.012  # the gap between a grid cell's edge and its furniture, as a fraction of the image
STATE_COLORS = {"hot": (255, 110, 0), "cool": (0, 200, 230), "clean": (170, 60, 230)}


def kind(obj: str) -> str:
    """'mug 1' -> 'mug': an object's (or receptacle's) kind, its name without the number."""
    return obj.rsplit(" ", 1)[0]


def place_phrase(receptacle: str) -> str:
    return f"{'in' if receptacle in INSIDE else 'on'} the {kind(receptacle)}"


def goal_text(task_type: str, what: str, target: str | None) -> str:
    """The goal in ALFWorld's templated wording."""
    if task_type == LOOK:
        return f"look at {'an' if what[0] in 'aeiou' else 'a'} {what} under the desklamp"
    if task_type == "pick_two_obj_and_place":
        return f"put two {what}s {place_phrase(target)}"
    state = TASKS[task_type][1]
    article = "an" if (state or what)[0] in "aeiou" else "a"
    return f"put {article} {state + ' ' if state else ''}{what} {place_phrase(target)}"


def _commands() -> list[tuple]:
    """Every command of the room as (verb, object, receptacle), in the action space's order."""
    commands = [("go to", None, r) for r in RECEPTACLES]
    commands += [(verb, None, r) for verb in ("open", "close") for r in OPENABLE]
    commands += [(verb, o, r) for verb in ("take", "put") for o in OBJECTS for r in RECEPTACLES]
    commands += [(verb, o, TREATMENTS[verb][0]) for verb in TREATMENTS for o in OBJECTS
                 if kind(o) in FOOD_AND_DISHES]
    commands += ([("use", None, LAMP)] + [("examine", o, None) for o in OBJECTS]
                 + [("inventory", None, None), ("look", None, None)])
    return commands


def command_text(verb: str, obj: str | None, receptacle: str | None) -> str:
    if verb == "take":
        return f"take {obj} from {receptacle}"
    if verb == "put":
        return f"put {obj} in/on {receptacle}"
    if verb in TREATMENTS:
        return f"{verb} {obj} with {receptacle}"
    return " ".join(part for part in (verb, obj, receptacle) if part)


def listing(objects) -> str:
    """ALFWorld's enumeration: 'a mug 1, and a cd 2', or 'nothing'."""
    names = [f"a {o}" for o in objects]
    return ("nothing" if not names else names[0] if len(names) == 1
            else ", ".join(names[:-1]) + ", and " + names[-1])


class HouseholdEnv(VisualTextEnv):
    """See the module docstring."""

    COMMANDS = _commands()
    actions = [command_text(*c) for c in COMMANDS]
    success_reward = 50.0
    inadmissible_penalty = -1.0
    max_steps = 50

    def __init__(self, image_size: int = 300, render_mode: str | None = None):
        super().__init__(image_size, render_mode)
        self.task = (TASK_TYPES[0], "mug", PLACES[0])
        self.cells = list(RECEPTACLES)
        self.where: dict[str, str | None] = dict.fromkeys(OBJECTS, RECEPTACLES[0])  # None: in hand
        self.states: dict[str, set] = {o: set() for o in OBJECTS}
        self.opened: set[str] = set()
        # None: the middle of the room, where every episode starts
        self.location: str | None = None
        self.holding: str | None = None
        self.lamp_on = False
        self.steps = 0
        self.feedback = ""

    # ------------------------------------------------------------------------- episodes

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = check_option_keys(options, {"task", "cells", "objects"})
        self.task = self._check_task(options["task"]) if "task" in options else self._draw_task()
        self.cells = self._check_cells(options["cells"]) if "cells" in options else [
            RECEPTACLES[i] for i in self.np_random.permutation(len(RECEPTACLES))]
        self.where = (self._check_objects(options["objects"]) if "objects" in options
                      else self._draw_objects())
        self.states = {o: set() for o in OBJECTS}
        self.opened, self.location, self.holding, self.lamp_on, self.steps = (set(), None, None,
                                                                              False, 0)
        if self._goal_met():
            raise ValueError(f"the goal {self.goal!r} is met before the first step; "
                             "put its objects elsewhere.")
        self.feedback = "You are in the middle of a room."
        return self._observation(), self._info()

    def _draw_task(self) -> tuple:
        task_type = TASK_TYPES[int(self.np_random.integers(len(TASK_TYPES)))]
        kinds = TASKS[task_type][0]
        what = kinds[int(self.np_random.integers(len(kinds)))]
        target = None if task_type == LOOK else PLACES[int(self.np_random.integers(len(PLACES)))]
        return task_type, what, target

    def _draw_objects(self) -> dict:
        _, what, target = self.task
        where = {}
        for obj in OBJECTS:  # an object of the goal's kind never starts where the goal wants it
            allowed = [r for r in RECEPTACLES if not (kind(obj) == what and r == target)]
            where[obj] = allowed[int(self.np_random.integers(len(allowed)))]
        return where

    def _check_task(self, task) -> tuple:
        example = '{"type": "pick_and_place_simple", "object": "mug", "target": "cabinet 1"}'
        if not isinstance(task, dict) or not set(task) <= {"type", "object", "target"}:
            raise ValueError(f"task must be a dict like {example}, got {task!r}.")
        task_type, what, target = task.get("type"), task.get("object"), task.get("target")
        if task_type not in TASKS:
            raise ValueError(f"task type {task_type!r} is not one of {TASK_TYPES}.")
        if what not in TASKS[task_type][0]:
            raise ValueError(f"{task_type} takes an object among {list(TASKS[task_type][0])}, "
                             f"got {what!r}.")
        if task_type == LOOK and target is not None:
            raise ValueError(f"{LOOK} has no target (the desklamp is the place); drop {target!r}.")
        if task_type != LOOK and target not in PLACES:
            raise ValueError(f"{task_type} needs a target among {PLACES}, got {target!r}.")
        return task_type, what, target

    @staticmethod
    def _check_cells(cells) -> list:
        if not isinstance(cells, (list, tuple)) or sorted(cells, key=str) != sorted(RECEPTACLES):
            raise ValueError(f"cells must list each of {RECEPTACLES} once (the grid's outer cells, "
                             f"row by row), got {cells!r}.")
        return list(cells)

    @staticmethod
    def _check_objects(objects) -> dict:
        if not isinstance(objects, dict) or set(objects) != set(OBJECTS):
            raise ValueError(f"objects must map each of {OBJECTS} to a receptacle, "
                             f"got {objects!r}.")
        for obj, receptacle in objects.items():
            if receptacle not in RECEPTACLES:
                raise ValueError(f"objects puts {obj} in {receptacle!r}; "
                                 f"receptacles are {RECEPTACLES}.")
        return dict(objects)

    @property
    def goal(self) -> str:
        return goal_text(*self.task)

    def step(self, action):
        verb, obj, receptacle = self.COMMANDS[self._check_action(action)]
        if not self._admissible(verb, obj, receptacle):
            return self.invalid_step()
        self.feedback = self._execute(verb, obj, receptacle)
        return self._finish_step(self.success_reward if self._goal_met() else 0.0)

    def invalid_step(self):
        """An inadmissible command, or an answer that names none: -1, nothing changes, the step
        counts."""
        self.feedback = "Nothing happens."
        return self._finish_step(self.inadmissible_penalty, admissible=False)

    def facts(self) -> list[str]:
        """The kind of object the agent deals with now: the one it holds, else the one its goal
        asks for (docs/ALGORITHM.md §4.5). A thought that has stopped looking at the state names
        the same object whatever it holds and whatever the task."""
        task_type, what, _ = self.task
        return [kind(self.holding) if self.holding is not None else what]

    def _finish_step(self, reward: float, admissible: bool = True):
        """Count the step; info["admissible"] says whether the command played was admissible,
        the share a run logs as `admissible` (rollout.Rollout)."""
        self.steps += 1
        terminated = self._goal_met()
        truncated = not terminated and self.steps >= self.max_steps
        info = {**self._info(), "admissible": admissible}
        if terminated or truncated:
            info["success"] = terminated
        return self._observation(), reward, terminated, truncated, info

    def _info(self) -> dict:
        return {"goal": self.goal, "task_type": self.task[0], "location": self.location,
                "holding": self.holding, "steps": self.steps, "feedback": self.feedback,
                "admissible_commands": self.admissible()}

    # ------------------------------------------------------------------------- rules

    def _reachable(self, receptacle: str) -> bool:
        """Its contents can be seen and reached: it does not open, or it is open."""
        return receptacle not in OPENABLE or receptacle in self.opened

    def _visible_here(self) -> list[str]:
        here = self.location
        return [o for o in OBJECTS
                if here is not None and self.where[o] == here and self._reachable(here)]

    def _admissible(self, verb, obj, receptacle) -> bool:
        here = receptacle == self.location
        if verb == "go to":
            return not here
        if verb in ("open", "close"):
            return here and (receptacle in self.opened) == (verb == "close")
        if verb == "take":
            return (here and self.holding is None and self.where[obj] == receptacle
                    and self._reachable(receptacle))
        if verb == "put":
            return here and self.holding == obj and self._reachable(receptacle)
        if verb in TREATMENTS:
            return here and self.holding == obj
        if verb == "use":
            return self.location == DESK
        if verb == "examine":
            return self.holding == obj or obj in self._visible_here()
        return True  # inventory, look

    def admissible(self) -> list[str]:
        """The commands admissible now, in the action space's order."""
        return [text for text, command in zip(self.actions, self.COMMANDS)
                if self._admissible(*command)]

    def _execute(self, verb, obj, receptacle) -> str:
        """Apply an admissible command; returns ALFWorld-style feedback."""
        if verb == "go to":
            self.location = receptacle
            return f"You arrive at {receptacle}. " + self._contents(receptacle)
        if verb == "open":
            self.opened.add(receptacle)
            return f"You open the {receptacle}. " + self._contents(receptacle)
        if verb == "close":
            self.opened.discard(receptacle)
            return f"You close the {receptacle}."
        if verb == "take":
            self.where[obj], self.holding = None, obj
            return f"You pick up the {obj} from the {receptacle}."
        if verb == "put":
            self.where[obj], self.holding = receptacle, None
            return f"You put the {obj} {'in' if receptacle in INSIDE else 'on'} the {receptacle}."
        if verb in TREATMENTS:
            state = TREATMENTS[verb][1]
            self.states[obj] = (self.states[obj] - {OPPOSITE.get(state)}) | {state}
            return f"You {verb} the {obj} using the {receptacle}."
        if verb == "use":
            self.lamp_on = not self.lamp_on
            return f"You turn {'on' if self.lamp_on else 'off'} the {LAMP}."
        if verb == "examine":
            states = " ".join(sorted(self.states[obj]))
            return f"This is a {states + ' ' if states else ''}{obj}."
        if verb == "inventory":
            return (f"You are carrying: a {self.holding}." if self.holding
                    else "You are not carrying anything.")
        if self.location is None:  # look
            return "You are in the middle of a room."
        return f"You are at {self.location}. " + self._contents(self.location)

    def _contents(self, receptacle: str) -> str:
        if not self._reachable(receptacle):
            return f"The {receptacle} is closed."
        seen = listing(o for o in OBJECTS if self.where[o] == receptacle)
        return f"{'In' if receptacle in INSIDE else 'On'} the {receptacle}, you see {seen}."

    def _counts(self, obj: str) -> bool:
        """The object is of the goal's kind and already where the goal wants it, as it wants it."""
        task_type, what, target = self.task
        state = TASKS[task_type][1]
        return (target is not None and kind(obj) == what and self.where[obj] == target
                and (state is None or state in self.states[obj]))

    def _goal_met(self) -> bool:
        task_type, what, _ = self.task
        if task_type == LOOK:
            return (self.location == DESK and self.lamp_on and self.holding is not None
                    and kind(self.holding) == what)
        return sum(map(self._counts, OBJECTS)) >= TASKS[task_type][2]

    # ------------------------------------------------------------------------- text side

    def prompt(self) -> str:
        commands = ", ".join(f'"{c}"' for c in self.admissible())
        return (f"You are in a room, seen from above in the image: "
                f"the furniture, the objects you can see, "
                f"where you are (in blue) and what you hold (in the middle). "
                f"Your task is to: {self.goal}. "
                f"{self.feedback} Admissible actions: {commands}. {ANSWER_INSTRUCTION}")

    def expert(self) -> tuple[str, int]:
        """The planner of the module docstring: (thoughts, action id) of its next command."""
        if self._goal_met() or self.steps >= self.max_steps:
            raise RuntimeError("the episode is over; call reset() first.")
        thoughts, command = self._plan()
        return thoughts, self.COMMANDS.index(command)

    def _plan(self) -> tuple[str, tuple]:
        task_type, what, target = self.task
        held, here = self.holding, self.location
        if held is not None and kind(held) == what:
            state = TASKS[task_type][1]
            verb = next((v for v, (_, s) in TREATMENTS.items() if s == state), None)
            if verb and state not in self.states[held]:
                appliance = TREATMENTS[verb][0]
                if here != appliance:
                    return (f"the {what} must be {state}, so I go to the {kind(appliance)}",
                            ("go to", None, appliance))
                return f"I {verb} the {what} here", (verb, held, appliance)
            goal_place = DESK if task_type == LOOK else target
            if here != goal_place:
                return (f"I have the {what}, so I go to the {kind(goal_place)}",
                        ("go to", None, goal_place))
            if task_type == LOOK:
                return (f"I hold the {what} at the desk, so I switch the lamp on",
                        ("use", None, LAMP))
            if not self._reachable(here):
                return (f"the {kind(here)} is closed, so I open it for the {what}",
                        ("open", None, here))
            return f"I put the {what} {place_phrase(here)}", ("put", held, here)
        if held is not None:  # the wrong thing in hand: put it down first
            if not self._reachable(here):
                return (f"I must put the {kind(held)} down, so I open the {kind(here)}",
                        ("open", None, here))
            return f"I do not need the {kind(held)}, so I put it down", ("put", held, here)
        # The search, by the text: the feedback lists what the receptacle here holds.
        wanted = [o for o in self._visible_here() if kind(o) == what and not self._counts(o)]
        if wanted:
            return f"the {here} holds a {what}, so I take it", ("take", wanted[0], here)
        if here is not None and not self._reachable(here):
            return f"the {here} is closed, so I open it to look for a {what}", ("open", None, here)
        if here is None:
            return (f"I look for a {what}, so I go to the {SEARCH_ORDER[0]}",
                    ("go to", None, SEARCH_ORDER[0]))
        following = SEARCH_ORDER[(SEARCH_ORDER.index(here) + 1) % len(SEARCH_ORDER)]
        return (f"the {here} holds no {what}, so I go to the {following}",
                ("go to", None, following))

    # ------------------------------------------------------------------------- picture

    def _cell_box(self, receptacle: str) -> tuple[float, float, float, float]:
        """The receptacle's box: the grid's outer cells row by row, the middle cell skipped."""
        index = self.cells.index(receptacle)
        row, col = divmod(index + (index >= 4), 3)
        c, pad = self.image_size / 3, self.image_size * CELL_PAD
        return col * c + pad, row * c + pad, (col + 1) * c - pad, (row + 1) * c - pad

    def _draw(self, image) -> None:
        draw = ImageDraw.Draw(image)
        s = self.image_size
        label_size = max(6, s // 22)
        for receptacle in RECEPTACLES:
            x0, y0, x1, y1 = self._cell_box(receptacle)
            fill = FURNITURE_COLORS[kind(receptacle)]
            draw.rectangle((x0, y0, x1, y1), fill=fill, outline=INK, width=max(1, s // 150))
            draw_text(image, ((x0 + x1) / 2, y0 + label_size * 0.8), kind(receptacle), label_size,
                      center=True)
            inner = (x0 + 0.08 * (x1 - x0), y0 + 0.3 * (y1 - y0), x1 - 0.08 * (x1 - x0),
                     y1 - 0.08 * (y1 - y0))
            # a closed door with a handle: the inside is hidden
            if not self._reachable(receptacle):
                draw.rectangle(inner, fill=tuple(v // 2 for v in fill), outline=INK)
                hx, hy = inner[2] - 0.12 * (inner[2] - inner[0]), (inner[1] + inner[3]) / 2
                r = max(1.5, s / 100)
                draw.ellipse((hx - r, hy - r, hx + r, hy + r), fill=(240, 220, 90))
                continue
            draw.rectangle(inner, fill=(250, 250, 245), outline=INK)
            if receptacle == DESK:
                lamp_x, lamp_y, r = (inner[2] - 0.15 * (inner[2] - inner[0]),
                                     inner[1] + 0.25 * (inner[3] - inner[1]), s / 40)
                if self.lamp_on:  # a glow around the lamp
                    draw.ellipse((lamp_x - 2 * r, lamp_y - 2 * r, lamp_x + 2 * r, lamp_y + 2 * r),
                                 fill=(255, 240, 120))
                draw.ellipse((lamp_x - r, lamp_y - r, lamp_x + r, lamp_y + r),
                             fill=(255, 200, 0) if self.lamp_on else (90, 90, 90), outline=INK)
            inside = [o for o in OBJECTS if self.where[o] == receptacle]
            slot = (inner[2] - inner[0]) / 3
            for i, obj in enumerate(inside):  # up to 6 objects: two rows of three slots
                cx = inner[0] + slot * (i % 3 + 0.5)
                cy = inner[1] + (inner[3] - inner[1]) * (0.3 + 0.45 * (i // 3))
                self._draw_object(draw, obj, cx, cy, slot * 0.3)
        middle = s / 3
        if self.holding is not None:  # the hand: what the agent holds, large, in the middle cell
            draw.rectangle((middle * 1.15, middle * 1.15, middle * 1.85, middle * 1.85),
                           fill=(225, 235, 255), outline=INK)
            self._draw_object(draw, self.holding, s / 2, s / 2, middle * 0.24)
        # the agent: a blue dot in the middle of the room, or a blue frame
        if self.location is None:
            r = s / 28
            draw.ellipse((s / 2 - r, s / 2 - r, s / 2 + r, s / 2 + r), fill=AGENT_BLUE, outline=INK)
        else:
            x0, y0, x1, y1 = self._cell_box(self.location)
            pad = s * CELL_PAD  # the frame lies in the gap between cells, clear of the label
            draw.rectangle((x0 - pad, y0 - pad, x1 + pad, y1 + pad), outline=AGENT_BLUE,
                           width=max(2, s // 60))

    def _draw_object(self, draw, obj: str, cx: float, cy: float, r: float) -> None:
        """One object as a coloured shape of radius ``r``; rings mark its states (hot, cool,
        clean)."""
        for i, state in enumerate(sorted(self.states[obj])):
            grow = r * (1.3 + 0.3 * i)
            draw.ellipse((cx - grow, cy - grow, cx + grow, cy + grow), outline=STATE_COLORS[state],
                         width=max(2, int(r / 4)))
        shape = kind(obj)
        color = OBJECT_COLORS[shape]
        if shape == "mug":  # a cup with a handle
            draw.rectangle((cx - 0.7 * r, cy - 0.8 * r, cx + 0.5 * r, cy + 0.8 * r), fill=color,
                           outline=INK)
            draw.rectangle((cx + 0.5 * r, cy - 0.4 * r, cx + r, cy + 0.3 * r), outline=color,
                           width=max(1, int(r / 4)))
        elif shape == "book":
            draw.rectangle((cx - 0.7 * r, cy - r, cx + 0.7 * r, cy + r), fill=color, outline=INK)
            draw.line((cx - 0.45 * r, cy - r, cx - 0.45 * r, cy + r), fill=INK)
        elif shape == "potato":
            draw.ellipse((cx - r, cy - 0.65 * r, cx + r, cy + 0.65 * r), fill=color, outline=INK)
        else:  # apple, cd: discs; a cd has a hole
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color, outline=INK)
            if shape == "cd":
                draw.ellipse((cx - 0.3 * r, cy - 0.3 * r, cx + 0.3 * r, cy + 0.3 * r),
                             fill=(255, 255, 255), outline=INK)
