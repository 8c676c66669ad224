"""Blackjack, drawn as cards: "hit" for another card or "stand" and let the dealer play.

Concept: RL4VLM's gym_cards Blackjack (docs/ALGORITHM.md §5), which is gymnasium's Blackjack-v1 with
``natural=False`` and ``sab=False`` rendered as a picture. The image shows the dealer's hand (the
first card face up, the rest face down) and the player's hand; the agent must read the cards, add
them up (J, Q, K count 10; an ace counts 11 unless that busts, then 1) and decide.

Rules (gymnasium's): an infinite deck (every draw is uniform over the 13 ranks, so ten-valued
cards come 4 times in 13); the player and the dealer start with two cards. "hit": one more
card; over 21 is a bust, reward -1, the episode ends; else reward 0. "stand": the dealer draws
until 17 or more (a soft 17 stands), then reward +1 / 0 / -1 for a higher / equal / lower score
(a bust scores 0). natural=False: a two-card 21 is paid like any win.
``invalid_step()`` (the model's answer named no admissible action): reward -1 and the hand
ends, a forfeit, without the dealer playing.

Deviations, on purpose: cards are drawn as ranks (gymnasium draws values; the reference then
never showed a "10" card), suits from ``self.np_random``; once the hand is over the dealer's
cards are all face up (the last frame, which no action follows, shows why the hand ended).

Expert: basic strategy for hit or stand only (no double or split exist here), dealer stands on
soft 17: hard 11 or less hit; hard 12 stand against 4-6; hard 13-16 stand against 2-6; hard 17+
stand; soft 17 or less hit; soft 18 stand against 2-8; soft 19+ stand.

Use::

    import gymnasium as gym, envs
    env = gym.make("gtr/Blackjack-v0").unwrapped
    obs, info = env.reset(options={"player": [10, 6], "dealer": [9, 13]})
    env.expert()        # ("my hand is hard 16 and the dealer shows 9, so I hit", 1)
"""
from __future__ import annotations

from .answer import ANSWER_INSTRUCTION
from .base import VisualTextEnv, check_option_keys
from .cards import SUITS, card_value, check_ranks, hand_boxes, paste_cards
from .drawing import draw_text


def hand_total(ranks) -> tuple[int, bool]:
    """(best total, soft): an ace counts 11 when that does not bust the hand (a 'soft' hand)."""
    total = sum(card_value(r) for r in ranks)
    if 1 in ranks and total + 10 <= 21:
        return total + 10, True
    return total, False


def basic_strategy(total: int, soft: bool, dealer_up: int) -> bool:
    """True = hit. ``dealer_up`` is the dealer's visible card value with the ace as 11."""
    if soft:
        return total <= 17 or (total == 18 and dealer_up >= 9)
    if total <= 11:
        return True
    if total == 12:
        return not 4 <= dealer_up <= 6
    if total <= 16:
        return dealer_up >= 7
    return False


class BlackjackEnv(VisualTextEnv):
    """See the module docstring. Actions: 0 = "stand", 1 = "hit"."""

    actions = ["stand", "hit"]

    def __init__(self, image_size: int = 300, render_mode: str | None = None):
        super().__init__(image_size, render_mode)
        self.player: list[tuple[int, str]] = []  # (rank, suit)
        self.dealer: list[tuple[int, str]] = []
        self.over = False

    def _card(self, rank: int | None = None) -> tuple[int, str]:
        if rank is None:
            rank = int(self.np_random.integers(1, 14))
        return rank, SUITS[int(self.np_random.integers(0, 4))]

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = check_option_keys(options, {"player", "dealer"})
        if options and set(options) != {"player", "dealer"}:
            raise ValueError('Blackjack options need both "player" and "dealer", '
                             'e.g. {"player": [10, 6], "dealer": [9, 13]}.')
        if options:
            player = check_ranks(options["player"], lambda n: n >= 2, "player (2 or more cards)")
            dealer = check_ranks(options["dealer"], lambda n: n >= 2, "dealer (2 or more cards)")
            if hand_total(player)[0] > 21:
                raise ValueError(f"player hand {player} is already bust (over 21); "
                                 "give a hand of 21 or less.")
            self.dealer = [self._card(r) for r in dealer]
            self.player = [self._card(r) for r in player]
        else:  # gymnasium's order: the dealer's two cards, then the player's two
            self.dealer = [self._card(), self._card()]
            self.player = [self._card(), self._card()]
        self.over = False
        return self._observation(), self._info()

    def step(self, action):
        if self._check_action(action) == 1:  # hit
            self.player.append(self._card())
            if self.player_total > 21:
                return self._end(-1.0)
            return self._observation(), 0.0, False, False, self._info()
        while hand_total(self._ranks(self.dealer))[0] < 17:  # stand: the dealer plays
            self.dealer.append(self._card())
        player = self.player_total
        dealer = hand_total(self._ranks(self.dealer))[0]
        dealer = 0 if dealer > 21 else dealer
        return self._end(float((player > dealer) - (player < dealer)))

    def invalid_step(self):
        """An answer with no admissible action forfeits the hand: -1, the episode ends."""
        return self._end(-1.0)

    def _end(self, reward: float):
        self.over = True
        info = self._info()
        info["success"] = reward > 0
        return self._observation(), reward, True, False, info

    @staticmethod
    def _ranks(hand) -> list[int]:
        return [rank for rank, _ in hand]

    @property
    def player_total(self) -> int:
        return hand_total(self._ranks(self.player))[0]

    def _info(self) -> dict:
        total, soft = hand_total(self._ranks(self.player))
        return {"player": self._ranks(self.player), "dealer": self._ranks(self.dealer),
                "player_suits": [s for _, s in self.player],
                "dealer_suits": [s for _, s in self.dealer],
                "player_total": total, "usable_ace": soft,
                "dealer_showing": card_value(self.dealer[0][0])}

    def prompt(self) -> str:
        return (
            "You are playing Blackjack. "
            "The image shows the dealer's cards (one face up) and your cards. "
            "Cards 2-10 count their number, J, Q and K count 10, an ace counts 11 or 1. "
            'Get closer to 21 than the dealer without going over: "hit" takes a card, "stand" ends '
            f"your turn and the dealer draws to 17. {self._admissible_text()} {ANSWER_INSTRUCTION}"
        )

    def facts(self) -> list[str]:
        """The player's total, soft or hard (whether an ace counts 11 changes the right move), and
        the dealer's face-up card, e.g. ["hard 16", "shows 9"] (docs/ALGORITHM.md §4.5)."""
        total, soft = hand_total(self._ranks(self.player))
        up = card_value(self.dealer[0][0])
        return [f"{'soft' if soft else 'hard'} {total}", f"shows {'an ace' if up == 1 else up}"]

    def expert(self) -> tuple[str, int]:
        """Basic strategy (module docstring); its thoughts name the facts."""
        total, soft = hand_total(self._ranks(self.player))
        up = card_value(self.dealer[0][0])
        hit = basic_strategy(total, soft, 11 if up == 1 else up)
        hand, dealer = self.facts()
        return (f"my hand is {hand} and the dealer {dealer}, so I {'hit' if hit else 'stand'}",
                int(hit))

    def _draw(self, image) -> None:
        s = self.image_size
        m = max(2, s // 50)
        label = s // 14
        # Fixed regions: "Dealer" and its row on top, "Player" and its row below. Room for 4
        # cards per row keeps every card in place (and the same size) as a hand grows to 4.
        dealer_box = (m, m + label + m, s - m, s // 2 - m)
        player_box = (m, s // 2 + label + m, s - m, s - m)
        draw_text(image, (m, m), "Dealer", label)
        draw_text(image, (m, s // 2), "Player", label)
        paste_cards(image, self.dealer, hand_boxes(len(self.dealer), dealer_box, m, slots=4),
                    face_up=None if self.over else 1)
        paste_cards(image, self.player, hand_boxes(len(self.player), player_box, m, slots=4))
