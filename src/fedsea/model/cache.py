"""KV-cache helpers shared by every part's cache: the rewind rule for full and sliding layers.

A part's cache (``SplitPart.new_cache``) is a transformers ``DynamicCache`` indexed by global
block number, whose sliding-window layers record their whole past so that a generation can be
rewound past the window (speculative decoding drops rejected draft tokens this way).
"""

from __future__ import annotations

from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer


def crop_cache(cache: DynamicCache, cut: int) -> None:
    """Remove the last ``cut`` slots of every layer of ``cache`` (``new_cache``'s, sliding layers too).

    Sliding-window layers of a part's cache record their whole past (``SplitPart.new_cache``), so
    they are cut like full layers; transformers' own ``crop`` would keep only a window's worth
    and could not be rewound a second time.
    """
    if cut <= 0:
        return
    for layer in cache.layers:
        if isinstance(layer, DynamicSlidingWindowLayer):  # a subclass of DynamicLayer: tested first
            if layer.is_initialized:
                assert layer.keys is not None and layer.values is not None
                # keys/values: (B, kv_heads, slots, head_dim); record_past keeps every slot seen.
                layer.keys, layer.values = layer.keys[:, :, :-cut], layer.values[:, :, :-cut]
                layer.cumulative_length -= cut
        elif isinstance(layer, DynamicLayer):
            layer.crop(-cut)  # transformers >= 5: minus the number of slots to remove
        else:
            raise TypeError(f"cannot rewind a {type(layer).__name__} cache layer")
