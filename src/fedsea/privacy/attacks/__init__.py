"""The attack suite: how much of a victim's text an honest-but-curious server recovers from h~_p.

(a) ``DecoderAttack``: learned inversion, a bidirectional transformer over the sequence;
(b) ``ProbeAttack``: a per-token MLP probe;
(c) ``OptimizationAttack``: gradient search over the head's inputs (BiSR-forward style),
    optionally started from a learned attack's guess (``prior=``, named ``"bisr"``).

Every attacker knows sigma, the clip norm, the noise shape and p, trains on public text
through its own copy of the mechanism, and never sees the victim's data or adapters.
"""

from fedsea.privacy.attacks.data import HiddenSet, Mechanism, encode_texts, head_states, release
from fedsea.privacy.attacks.decoder import DecoderAttack
from fedsea.privacy.attacks.learned import Attack, TrainConfig
from fedsea.privacy.attacks.metrics import AttackScores, rouge_l, score
from fedsea.privacy.attacks.optimization import OptimizationAttack, OptimizationConfig
from fedsea.privacy.attacks.probe import ProbeAttack

__all__ = [
    "Attack",
    "AttackScores",
    "DecoderAttack",
    "HiddenSet",
    "Mechanism",
    "OptimizationAttack",
    "OptimizationConfig",
    "ProbeAttack",
    "TrainConfig",
    "encode_texts",
    "head_states",
    "release",
    "rouge_l",
    "score",
]
