"""The family of worlds: truth models over the same contract tables, chosen by name.

Every world writes the same four tables (so the feature pipeline and the models run unchanged on each) and
the same ``truth.parquet``; what differs is which terms drive the click and the purchase, their weights,
a few traffic parameters and the default numbers of users and items. A world is a :class:`World`: a tuple of
:class:`Term` (a raw value named in :data:`synth.truth.RAW_TERMS`, its frozen centre and scale, its click
weight and its share of the purchase direction). The rest of the model is shared by all worlds (see
:mod:`synth.world`): ``logit p_click = b_c + w_c . z - 0.7 log(pos)``, ``logit p_purchase_given_click =
b_p + w_p . z`` with ``w_p = rho * w_c + sqrt(1 - rho**2) * w_perp``, ``w_perp`` the world's purchase
direction made orthogonal to ``w_c`` and scaled to ``|w_c|`` (``rho`` is ``task_correlation``), and both
biases calibrated to a 5% click rate and 10% purchases per click.

The worlds
----------
* ``default``: today's world, described in :mod:`synth.world` (ten terms, Dirichlet(0.5) preferences,
  ``n_impressions / 100`` users and ``/ 50`` items). The same seed gives the same bytes as before worlds
  existed; its ``truth_model`` metadata carries no ``world`` key, as files written before.
* ``interest``: strongly peaked interests. Preferences are Dirichlet(0.15) over the 20 top categories (most
  users care about one to three), and 70% of a page's slots follow them. The click is the user's bias plus
  the user-category affinity (heaviest weight) plus hour; purchase given click is the user's price
  sensitivity times the item's price relative to its leaf category, the item's quality, the member level
  and the device.
* ``daypart``: context times category, no user-category affinity. Each top category has a peak hour
  (:data:`PEAK_HOUR`; groceries in the morning, electronics late in the evening) and a weekend lift
  (:data:`WEEKEND_LIFT`; garden and outdoors up, computers down); clicks follow the user's bias, the item's
  quality, the category's fit to the hour and to the day, the page, and the price relative to the leaf
  category (the same for all users); purchase given click follows that price, the rating, the weekend fit,
  the member level, and a little quality and page. Its biases are calibrated on a week, not a day.

Sizes
-----
In ``default`` the users and items grow linearly with the impressions, so each user keeps ~100 impressions
(~5 clicks) at every size and a user's latent traits never become identifiable. The other worlds take
``5 * sqrt(n_impressions)`` users and items (at least 100 and 200): ~280 impressions per user at 2M, ~890 at
20M, so per-user and per-item latents become identifiable as data grows and the oracle is approachable at
20M. ``docs/features.md`` (section "Worlds") has the table.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from features.checks import check_choice
from synth.world import COMPONENTS, PURCHASE_DIRECTION, W_CLICK, Z_CENTER, Z_SCALE


@dataclass(frozen=True)
class Term:
    """One term of a truth model: ``z = (raw - center) / scale``, weighted ``w_click`` in the click logit.

    Attributes:
        name: a key of :data:`synth.truth.RAW_TERMS`.
        w_click: weight in the click logit.
        purchase: the term's entry in the purchase direction (before it is made orthogonal to ``w_c``).
        center: frozen centre of the raw value over impressions.
        scale: frozen spread of the raw value over impressions (> 0).
    """

    name: str
    w_click: float
    purchase: float
    center: float = 0.0
    scale: float = 1.0


@dataclass(frozen=True)
class World:
    """A truth model and the traffic and sizes it needs.

    Attributes:
        name: the name given to ``generate(world=...)`` and ``--world``.
        terms: the terms, in the order of ``TruthModel.w_click``.
        pref_concentration: Dirichlet concentration of the users' top-category preferences (smaller: peakier).
        sqrt_sizes: default users and items ``5 * sqrt(n_impressions)`` (else ``n / 100`` and ``n / 50``).
        pilot_days: consecutive days mid-window the biases are calibrated on (7 covers a weekend).

    Example:
        >>> get_world("interest").components
        ('propensity', 'affinity', 'hour', 'price', 'quality', 'member', 'device')
    """

    name: str
    terms: tuple[Term, ...]
    pref_concentration: float = 0.5
    sqrt_sizes: bool = True
    pilot_days: int = 7

    @property
    def components(self) -> tuple[str, ...]:
        """The terms' names, in order."""
        return tuple(t.name for t in self.terms)

    def default_users(self, n_impressions: int) -> int:
        """Users when none are given: ``5 sqrt(n)`` (``n / 100`` in the linear worlds), at least 100."""
        return max(100, round(5 * math.sqrt(n_impressions)) if self.sqrt_sizes else n_impressions // 100)

    def default_items(self, n_impressions: int) -> int:
        """Items when none are given: ``5 sqrt(n)`` (``n / 50`` in the linear worlds), at least 200."""
        return max(200, round(5 * math.sqrt(n_impressions)) if self.sqrt_sizes else n_impressions // 50)

    def to_json(self) -> str:
        """The world's name and parameters as a JSON object."""
        return json.dumps(asdict(self), sort_keys=True)


# Peak hour (UTC) of each top category's clicks, in the order of TOP_CATEGORIES.
PEAK_HOUR = (
    20, 20, 13, 22, 23, 10, 8, 11, 9, 21,
    22, 14, 10, 19, 6, 7, 8, 23, 9, 18,
)  # fmt: skip
# Weekend lift of each top category (Saturdays and Sundays), in the order of TOP_CATEGORIES.
WEEKEND_LIFT = (
    0.5, 0.3, 0.2, 0.2, 0.3, 0.6, 0.4, 0.6, 1.0, -0.2,
    -0.3, -0.8, 0.2, 0.5, 0.0, 0.8, 1.0, 0.4, -0.4, 0.0,
)  # fmt: skip

DEFAULT = World(
    "default",
    tuple(
        Term(name, float(w), float(v), float(c), float(s))
        for name, w, v, c, s in zip(COMPONENTS, W_CLICK, PURCHASE_DIRECTION, Z_CENTER, Z_SCALE, strict=True)
    ),
    pref_concentration=0.5,
    sqrt_sizes=False,
    pilot_days=1,
)
# Centres and scales of the new worlds' raw values: measured once over the last 20 days of a 500k-impression
# world of seed 0 (``python -m benchmarks.worlds_table``) and frozen, like the default world's. Propensity
# and quality keep their prior sd, member level its exact mean and sd under MEMBER_PROBS.
INTEREST = World(
    "interest",
    (
        Term("propensity", 0.45, 0.0, 0.0, 0.3),
        Term("affinity", 0.90, 0.0, 0.40, 1.88),
        Term("hour", 0.10, 0.0),
        Term("price", 0.0, 1.0, -0.03, 0.39),
        Term("quality", 0.0, 0.6, 0.0, 0.4),
        Term("member", 0.0, 0.5, 1.05, 1.20),
        Term("device", 0.0, 0.4),
    ),
    pref_concentration=0.15,
)
DAYPART = World(
    "daypart",
    (
        Term("propensity", 0.45, 0.0, 0.0, 0.3),
        Term("quality", 0.45, 0.2, 0.0, 0.4),
        Term("daypart", 0.60, 0.0, -0.02, 0.76),
        Term("weekend", 0.35, 0.4, 0.06, 0.25),
        Term("page", 0.25, 0.2),
        Term("relative_price", 0.25, 1.0, -0.06, 0.57),
        Term("rating", 0.0, 0.7, -0.03, 0.50),
        Term("member", 0.0, 0.3, 1.05, 1.20),
    ),
)
WORLDS = {w.name: w for w in (DEFAULT, INTEREST, DAYPART)}
"""The registry: name -> world."""


def get_world(name: str) -> World:
    """The world called ``name``.

    Raises:
        ValueError: ``generate.world: expected one of [...], got 'name'`` for an unknown name.
    """
    check_choice("generate", "world", name, tuple(WORLDS))
    return WORLDS[name]
