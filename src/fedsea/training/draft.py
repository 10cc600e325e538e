"""What a drafter proposes (``Draft``) and the logits processors it is given (``Scores``).

Its own module so that drafters living elsewhere (``fedsea.training.bridge_drafter``) and the
registry in ``fedsea.training.drafters`` share them without importing each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Draft:
    """Proposed tokens and, for a sampling model drafter, the distributions they were drawn from.

    Args:
        tokens: the m <= k proposed ids (empty: no guess, the loop does a plain step).
        probs: (m, V) the drafter's q for each token given the text before it; None for a
            deterministic drafter (q is a point mass on each token).
    """

    tokens: list[int]
    probs: torch.Tensor | None = None


# ``scores(prefix_ids (1, T), logits (1, V)) -> (1, V)``: the generation's logits processors.
Scores = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def pick(processed: torch.Tensor, generator: torch.Generator | None) -> tuple[int, torch.Tensor | None]:
    """A draft token from the processed logits (1, V): drawn from their softmax q, returned as (V,)
    (sampling: the acceptance rule needs q), or their argmax and None (greedy)."""
    if generator is not None:
        q = torch.softmax(processed, dim=-1)  # (1, V)
        return int(torch.multinomial(q, 1, generator=generator)), q[0]
    return int(processed.argmax(dim=-1)), None
