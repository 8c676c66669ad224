"""Points24: write a formula with the four cards' values that equals 24, one token per step.

Concept: the hardest of RL4VLM's gym_cards tasks and GTR-Turbo's main benchmark (docs/ALGORITHM.md
§4.4, §5). The image shows four cards (J, Q, K count 10, A counts 1) and the formula written so far.
The agent adds one token per step: a number '1'..'10', an operator '+', '-', '*', '/', a
parenthesis, or '=' to submit. Deals are uniform (ranks 1..13) and not always solvable.

Rules (as in gym_cards, quirks included):
- A number that is not among the still unused cards costs -1, appends a blank to the formula
  (the formula can then never be right) and the episode goes on.
- '=' evaluates: +10 if the formula equals 24 and used every card, else -1; the episode ends.
- Any other token: reward 0, appended.
- When a step starts with the formula longer than 20 tokens, the episode ends with -1
  (gym_cards checks the length before it looks at the action).
- ``invalid_step()`` (the model's answer named no admissible action) is exactly an
  unavailable number: -1, a blank appended, and the length limit still applies.

Deviations from gym_cards, on purpose: the formula is evaluated by a small exact parser over
fractions instead of Python's ``eval`` of the joined tokens. ``eval`` rounds (8/(3-8/3) gave
23.999... and was refused), read two number tokens in a row as one number ("2","4" made 24) and
accepted unary minus and '**'. Here only the grammar of binary + - * / with parentheses counts. The
length limit ends the episode with ``terminated=True`` where gym_cards says ``truncated=True``: it
is a rule of the game, not a time limit, and it leaves the state unchanged, so an agent that
bootstraps truncated episodes from V(final state) would bootstrap a state from itself (with the +3
format bonus, a fixed point of (-1 + 3) / (1 - 0.9) = +20, more than a success earns) and learn to
run formulas out to the limit. Randomness comes from ``self.np_random``, so ``reset(seed=...)``
reproduces a deal. A blank is drawn as "_" so the agent can see it.

Expert: a solver that completes the current formula (see ``complete``; exact fractions). For any
formula that can still be completed, the agent's own included, it finds the shortest completion, and
the expert emits its next token (the deal's first plan takes < 50 ms; a plan is cached, so following
it costs nothing more). Why a solver over the grammar and not a plain list of the deal's formulas
(4! card orders x 4^3 operators x 5 bracketings): the expert must complete any prefix the agent
wrote, redundant parentheses and odd orders included, and a list completes only the prefixes of
its own spellings; the exact parser is needed anyway to judge the agent's '='. When no
completion exists (an unsolvable deal, a blank, a dead end), it chooses '=' at once: every such
episode can earn at best -1 (from '=' or from the length truncation), and only '=' takes it
without wasted steps.

``PointsEnv`` holds all of this with the target, card count, operators and length limit as
class attributes; ``EZPointsEnv`` (ez_points.py) is the two-card variant.

Use::

    import gymnasium as gym, envs
    env = gym.make("gtr/Points24-v0").unwrapped
    obs, info = env.reset(seed=0)               # or options={"cards": [8, 3, 8, 3]}
    thoughts, action = env.expert()             # next token of a solution, e.g. ("...", id of '8')
    obs, reward, terminated, truncated, info = env.step(action)
"""
from __future__ import annotations

from fractions import Fraction
from functools import lru_cache

from .answer import ANSWER_INSTRUCTION
from .base import VisualTextEnv, check_option_keys
from .cards import SUITS, card_value, check_ranks, hand_boxes, paste_cards
from .drawing import draw_text, wrap_words

# ----------------------------------------------------------------------------- formulas
# Precedence levels of a (sub)formula: 1 = a sum or difference at its top, 2 = a product or
# quotient, 3 = a single number or something in parentheses. An operand "needs" a level: the
# right side of '/' needs 3 (8 / (2 * 2) differs from 8 / 2 * 2), and so on.
# op: (left need, right need, level)
RULES = {"+": (1, 1, 1), "-": (1, 2, 1), "*": (2, 2, 2), "/": (2, 3, 2)}

# While a formula is read left to right, each open parenthesis level is a "frame"
# (acc, addop, prod, mulop): the sum so far and its pending + or -, the product of the current
# term so far and its pending * or /. A frame waits for an operand when prod is None (a new
# term) or a mulop is pending.
EMPTY = (None, None, None, None)


def _apply(a: Fraction, op: str, b: Fraction) -> Fraction | None:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return None if b == 0 else a / b  # division by zero makes the whole formula invalid


def is_number(token: str) -> bool:
    """A number token ('1'..'10'); ASCII only, since int() would choke on digits like '²'."""
    return token.isascii() and token.isdigit()


def _waits(frame) -> bool:
    return frame[2] is None or frame[3] is not None


def _feed(frame, x: Fraction):
    """The frame after the operand ``x`` (a number or a closed parenthesis) arrived."""
    acc, addop, prod, mulop = frame
    prod = x if prod is None else _apply(prod, mulop, x)
    return None if prod is None else (acc, addop, prod, None)


def _close(frame) -> Fraction:
    """Value of a frame whose last term is complete."""
    acc, addop, prod, _ = frame
    return prod if acc is None else _apply(acc, addop, prod)


def read_formula(tokens) -> list | None:
    """Read a formula (or the start of one) into its open frames, outermost first.

    None when the tokens cannot start a valid formula: two numbers or two operators in a row,
    an unmatched ')', a blank, a division by zero.
    """
    frames = [EMPTY]
    for tok in tokens:
        top = frames[-1]
        if is_number(tok) or tok == "(":
            if not _waits(top):
                return None
            if tok == "(":
                frames.append(EMPTY)
                continue
            frames[-1] = _feed(top, Fraction(int(tok)))
        elif tok == ")":
            if _waits(top) or len(frames) == 1:
                return None
            frames.pop()
            frames[-1] = _feed(frames[-1], _close(top))
        elif tok in ("*", "/"):
            if _waits(top):
                return None
            frames[-1] = top[:3] + (tok,)
        elif tok in ("+", "-"):
            if _waits(top):
                return None
            frames[-1] = (_close(top), tok, None, None)
        else:  # a blank or anything unknown
            return None
        if frames[-1] is None:
            return None
    return frames


def evaluate(tokens) -> Fraction | None:
    """Exact value of a complete formula, or None if it is not one."""
    frames = read_formula(tokens)
    if frames is None or len(frames) != 1 or _waits(frames[0]):
        return None
    return _close(frames[0])


def _keep(table: dict, key, tokens: tuple) -> None:
    """Keep the shortest token tuple per key (the first found among equals)."""
    if key not in table or len(tokens) < len(table[key]):
        table[key] = tokens


@lru_cache(maxsize=4096)
def _splits(cards: tuple) -> list[tuple[tuple, tuple]]:
    """All (part, rest) of a sorted multiset of card values, part non-empty, no duplicates."""
    seen = {}
    for mask in range(1, 2 ** len(cards)):
        part = tuple(v for i, v in enumerate(cards) if mask >> i & 1)
        rest = tuple(v for i, v in enumerate(cards) if not mask >> i & 1)
        seen[part, rest] = None
    return list(seen)


@lru_cache(maxsize=4096)
def expressions(cards: tuple, ops: str, parens: bool) -> dict:
    """Every value a formula over exactly the (sorted) card values reaches, with its shortest
    tokens.

    ``{value: [t1, t2, t3]}``: t_k is the shortest token tuple of that value usable where level
    k is needed (wrapped in parentheses if that helps and they are allowed; None if impossible).
    Built bottom-up: a formula is left-part op right-part over a split of the cards.
    """
    if len(cards) == 1:
        tokens = (str(cards[0]),)
        return {Fraction(cards[0]): [tokens, tokens, tokens]}
    table: dict = {}
    for part, rest in _splits(cards):
        if not rest:
            continue
        left, right = expressions(part, ops, parens), expressions(rest, ops, parens)
        for op in ops:
            if op in "+*" and part > rest:  # a + b and b + a: the mirrored split adds nothing
                continue
            left_need, right_need, level = RULES[op]
            rights = [(b, t[right_need - 1]) for b, t in right.items()
                      if t[right_need - 1] is not None]
            for a, a_tokens in left.items():
                if a_tokens[left_need - 1] is None:
                    continue
                for b, b_tokens in rights:
                    value = _apply(a, op, b)
                    if value is None:
                        continue
                    length = len(a_tokens[left_need - 1]) + 1 + len(b_tokens)
                    best = table.setdefault(value, [None, None, None])
                    for need in (1, 2, 3):
                        # Too low a level for this need: parentheses make it an operand (2 more
                        # tokens).
                        wrap = level < need
                        if (wrap and not parens) or (best[need - 1] is not None
                                                     and len(best[need - 1]) <= length + 2 * wrap):
                            continue
                        tokens = a_tokens[left_need - 1] + (op,) + b_tokens
                        best[need - 1] = ("(",) + tokens + (")",) if wrap else tokens
    return table


@lru_cache(maxsize=4096)
def _chains(cards: tuple, ops: str, parens: bool, kind: str) -> dict:
    """Operator chains over some of the (sorted) cards: {(cards left, effect): tokens}.

    kind "*": sequences of '* operand' / '/ operand', which multiply the current term by
    ``effect`` (8 * 3 / 2 = 8 * (3/2): * and / chain left to right, so only the product of
    the factors matters). kind "+": sequences of '+ term' / '- term', which add ``effect`` to
    the sum. The empty chain is included (effect 1 or 0). Independent of what came before, so
    cached per multiset of cards.
    """
    out = {(cards, Fraction(1 if kind == "*" else 0)): ()}
    for op in ops:
        if (op in "*/") != (kind == "*"):
            continue
        # A new term needs level 2: a sum there would swallow a following '*'.
        need = RULES[op][1] if kind == "*" else 2
        for part, rest in _splits(cards):
            for value, tokens in expressions(part, ops, parens).items():
                if tokens[need - 1] is None or (op == "/" and value == 0):
                    continue
                if op == "/":
                    step = 1 / value
                elif op == "-":
                    step = -value
                else:
                    step = value
                for (left, effect), more in _chains(rest, ops, parens, kind).items():
                    _keep(out, (left, step * effect if kind == "*" else step + effect),
                          (op,) + tokens[need - 1] + more)
    return out


def _tails(frame, cards: tuple, ops: str, parens: bool, target: Fraction | None) -> dict:
    """Ways to go on from a frame whose last term is complete: {(cards left, value): tokens}.

    Any continuation is a '*'/'/' chain on the current term followed by a '+'/'-' chain.
    With a ``target`` only the endings that use every card and hit it are looked up.
    """
    acc, addop, prod, _ = frame
    out: dict = {}
    for (left, factor), mul_tokens in _chains(cards, ops, parens, "*").items():
        term = prod * factor
        total = term if acc is None else _apply(acc, addop, term)
        adds = _chains(left, ops, parens, "+")
        if target is None:
            for (rest, addend), add_tokens in adds.items():
                _keep(out, (rest, total + addend), mul_tokens + add_tokens)
        elif ((), target - total) in adds:
            _keep(out, ((), target), mul_tokens + adds[(), target - total])
    return out


def _endings(frame, cards: tuple, ops: str, parens: bool, target: Fraction | None) -> dict:
    """Ways to finish the innermost frame: {(cards left, value): tokens} (``target``: see
    _tails)."""
    if not _waits(frame):
        return _tails(frame, cards, ops, parens, target)
    out: dict = {}
    if frame == EMPTY:  # nothing written here yet: one formula over some cards is any ending
        for part, rest in _splits(cards):
            for value, tokens in expressions(part, ops, parens).items():
                if target is None or (not rest and value == target):
                    _keep(out, (rest, value), tokens[0])
        return out
    need = 3 if frame[3] == "/" else 2  # the operand after '/' must be a single unit
    for part, rest in _splits(cards):
        for value, tokens in expressions(part, ops, parens).items():
            fed = _feed(frame, value)
            if tokens[need - 1] is not None and fed is not None:
                for key, more in _tails(fed, rest, ops, parens, target).items():
                    _keep(out, key, tokens[need - 1] + more)
    return out


def complete(formula, cards, target: int, ops: str, parens: bool, max_len: int) -> tuple | None:
    """Shortest tokens that turn ``formula`` into one that uses every card value once and equals
    ``target``: () if it already does, None if no completion fits in ``max_len`` tokens.

    ``ops`` are the allowed binary operators ("+-*/" or a subset), ``parens`` whether '(' and
    ')' are allowed. Exact: the formula is read into its open frames; the innermost is finished
    (an operand if one is due, then operator chains over some of the unused cards), ')' hands
    its value to the frame around it, which is finished the same way, and so on outward; the
    outermost must use the last cards and hit the target. Sub-formulas always come in their
    shortest form, so the completion is as short as possible.
    """
    frames = read_formula(formula)
    if frames is None:
        return None
    left = sorted(cards)
    for tok in formula:
        if is_number(tok):
            if int(tok) not in left:
                return None
            left.remove(int(tok))
    goal = Fraction(target)
    ends = _endings(frames[-1], tuple(left), ops, parens, goal if len(frames) == 1 else None)
    for depth in range(len(frames) - 2, -1, -1):
        outer: dict = {}
        for (rest, value), tokens in ends.items():
            fed = _feed(frames[depth], value)
            if fed is not None:
                for key, more in _tails(fed, rest, ops, parens,
                                        goal if depth == 0 else None).items():
                    _keep(outer, key, tokens + (")",) + more)
        ends = outer
    best = ends.get(((), goal))
    return best if best is not None and len(formula) + len(best) <= max_len else None


# ----------------------------------------------------------------------------- environment


class PointsEnv(VisualTextEnv):
    """The card-formula game; subclasses set the class attributes below."""

    title = "Points24"
    target = 24
    n_cards = 4
    max_len = 20  # a step that starts with a longer formula ends the episode
    operators = ["+", "-", "*", "/", "(", ")"]
    operators_text = "+, -, *, / and parentheses"
    cards_height = 0.36  # share of the image height given to the row of cards

    def __init__(self, image_size: int = 300, render_mode: str | None = None):
        self.actions = [str(v) for v in range(1, 11)] + self.operators + ["="]
        super().__init__(image_size, render_mode)
        self._ops = "".join(op for op in self.operators if op in RULES)
        self._parens = "(" in self.operators
        self.ranks: list[int] = []
        self.suits: list[str] = []
        self.formula: list[str] = []
        self._plans: dict = {}

    # --- state

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = check_option_keys(options, {"cards"})
        if "cards" in options:
            self.ranks = check_ranks(options["cards"], lambda n: n == self.n_cards,
                                     f"cards (need {self.n_cards})")
        else:
            self.ranks = self._deal()
        self.suits = [SUITS[int(i)] for i in self.np_random.integers(0, 4, size=self.n_cards)]
        self.formula = []
        self._plans = {}  # expert completions of this deal, by formula
        return self._observation(), self._info()

    def _deal(self) -> list[int]:
        return [int(r) for r in self.np_random.integers(1, 14, size=self.n_cards)]

    @property
    def values(self) -> list[int]:
        return [card_value(r) for r in self.ranks]

    def _unused(self) -> list[int]:
        left = list(self.values)
        for tok in self.formula:
            if is_number(tok):
                left.remove(int(tok))
        return left

    # --- dynamics

    def step(self, action):
        return self._play(self.actions[self._check_action(action)])

    def invalid_step(self):
        """An answer with no admissible action: treated as an unavailable number (-1, blank)."""
        return self._play(None)

    def _play(self, token: str | None):
        if len(self.formula) > self.max_len:  # checked first, as in gym_cards
            # A rule of the game: terminated, not truncated (see the module docstring).
            return self._result(-1.0, terminated=True)
        if token == "=":
            success = evaluate(self.formula) == self.target and not self._unused()
            return self._result(10.0 if success else -1.0, terminated=True, success=success)
        if token is None or (is_number(token) and int(token) not in self._unused()):
            self.formula.append(" ")  # the blank: the formula grows, the episode goes on
            return self._result(-1.0)
        self.formula.append(token)
        return self._result(0.0)

    def _result(self, reward: float, terminated: bool = False, truncated: bool = False,
                success: bool = False):
        info = self._info()
        if terminated or truncated:
            info["success"] = success
        return self._observation(), reward, terminated, truncated, info

    def facts(self) -> list[str]:
        """The cards' values, one per card (docs/ALGORITHM.md §4.5): the numbers the formula is
        made of."""
        return [str(v) for v in self.values]

    def _info(self) -> dict:
        return {"cards": list(self.ranks), "suits": list(self.suits), "values": self.values,
                "formula": list(self.formula),
                "used_cards": [int(t) for t in self.formula if is_number(t)],
                "target": self.target}

    # --- text side

    def formula_text(self) -> str:
        return " ".join("_" if t == " " else t for t in self.formula)

    def prompt(self) -> str:
        count = {2: "two", 4: "four"}.get(self.n_cards, str(self.n_cards))
        return (
            f"You are playing {self.title}. The image shows {count} cards; "
            "J, Q and K count as 10, A as 1. "
            f"Build a formula that uses each card's value exactly once, "
            f"with {self.operators_text}, "
            f'and equals {self.target}. Write one number or symbol per step, then "=". '
            f"Current formula: {self.formula_text() or '(empty)'}. "
            f"{self._admissible_text()} {ANSWER_INSTRUCTION}"
        )

    def _plan(self, formula: tuple) -> tuple | None:
        """Cached shortest completion of ``formula``. Once found, every step along it is cached
        too (the rest of a shortest completion is a shortest completion of the longer formula),
        so an expert that follows its own plan solves each deal once."""
        if formula not in self._plans:
            plan = complete(formula, self.values, self.target, self._ops, self._parens,
                            self.max_len)
            self._plans[formula] = plan
            for i in range(1, len(plan or ()) + 1):
                self._plans.setdefault(formula + plan[:i], plan[i:])
        return self._plans[formula]

    def expert(self) -> tuple[str, int]:
        """Next token of the shortest solution that continues the current formula, or '='."""
        cards = ", ".join(map(str, self.values))
        plan = self._plan(tuple(self.formula))
        if plan is None:
            if self._plan(()) is None:
                thoughts = f"cards {cards} cannot make {self.target}, so I end with ="
            else:
                thoughts = (f"cards {cards}; {self.formula_text()} cannot reach {self.target}, "
                            "so I end with =")
            return thoughts, self.actions.index("=")
        token = plan[0] if plan else "="
        solution = " ".join(self.formula + list(plan))
        return (f"cards {cards}; {solution} = {self.target}, so next is {token}",
                self.actions.index(token))

    # --- picture

    def _draw(self, image) -> None:
        s = self.image_size
        m = max(2, s // 50)
        # One row of cards across the full width: the ranks are as big as the width allows.
        boxes = hand_boxes(self.n_cards, (m, m, s - m, m + int(s * self.cards_height)), gap=m)
        paste_cards(image, zip(self.ranks, self.suits), boxes)
        size = s // 9  # the longest formula (21 tokens) still fits in four lines
        top = max(y + h for _, y, _, h in boxes) + 2 * m
        words = ["Formula:"] + ["_" if t == " " else t for t in self.formula]
        for i, line in enumerate(wrap_words(words, size, s - 4 * m)):
            draw_text(image, (2 * m, top + i * size * 1.25), line, size)


class Points24Env(PointsEnv):
    """Four cards, target 24, + - * / and parentheses, formulas up to 20 tokens (module
    docstring)."""
