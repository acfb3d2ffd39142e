"""The side network's KV cache lives inside the backbone's own cache object.

During generation each side block must see the keys and values of all earlier tokens, as the backbone's blocks do.
Rather than keeping a second cache beside the backbone's (which every generation strategy would have to know about),
side block k of a stack of depth L stores its keys and values in layer slot ``L + k`` of the *same* cache object.
Everything transformers does to the cache then applies to the side network for free: beam search's
``reorder_cache``, ``batch_repeat_interleave`` for ``num_return_sequences``, contrastive search's ``crop``, and a
cache object the user passes in. The slots are appended when the side network first runs on a cache; the backbone
never reads beyond its own L slots.
"""

from __future__ import annotations

from transformers.cache_utils import Cache, DynamicLayer, EncoderDecoderCache, StaticLayer


class UnsupportedCacheError(TypeError):
    """A cache type whose layer slots we cannot extend for the side network."""


def reserve_side_slots(cache: Cache | None, first_slot: int, count: int) -> None:
    """Make sure ``cache`` has layer slots ``first_slot .. first_slot + count - 1`` for the side blocks."""
    if cache is None:
        return
    if isinstance(cache, EncoderDecoderCache):
        parts = [cache.self_attention_cache, cache.cross_attention_cache]
    else:
        parts = [cache]
    for part in parts:
        while len(part.layers) < first_slot + count:
            part.layers.append(_new_layer_like(part))


def _new_layer_like(cache: Cache):
    if cache.layer_class_to_replicate is not None:
        return cache.layer_class_to_replicate()
    template = cache.layers[0] if cache.layers else None
    if isinstance(template, StaticLayer):  # also the sliding-window variant: side slots keep every position
        return StaticLayer(max_cache_len=template.max_cache_len)
    if isinstance(template, DynamicLayer):
        return DynamicLayer()
    raise UnsupportedCacheError(
        f"Ladder side-tuning cannot add its side layers to a {type(cache).__name__} whose layers are "
        f"{type(template).__name__}. Generate with the default DynamicCache (pass no cache) or a StaticCache."
    )
