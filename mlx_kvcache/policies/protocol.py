"""The one extension point: what a layer's cache policy must offer."""

from typing import Callable, Dict, Optional, Protocol, Union

import mlx.core as mx

# A layer's RoPE module: rope(x, offset=start_position) rotates x [B, H, L, D].
Rope = Callable[..., mx.array]


class CachePolicy(Protocol):
    """One instance per layer. Built by name through `make_cache`."""

    name: str  # the registry key, also written into saved caches
    offset: int  # absolute tokens seen; the next token's RoPE position

    def attend(
        self,
        queries: mx.array,
        keys: mx.array,
        values: mx.array,
        *,
        rope: Optional[Rope],
        scale: float,
        mask: Optional[Union[str, mx.array]],
    ) -> mx.array:
        """Store the new keys/values, choose what to attend over, and return the
        attention output [B, Hq, L, D].

        queries [B, Hq, L, D] and keys/values [B, Hkv, L, D] are the layer's L new
        positions, BEFORE RoPE: the policy rotates them (so it may keep keys
        unrotated or score with pre-RoPE queries). rope=None means they are
        already rotated (mlx-lm's models do it themselves). mask is the model's
        request: None or "causal" over the L new tokens, or an explicit array.
        """
        ...

    def stats(self) -> dict:
        """Figures for --verbose and --stats-json (tokens kept, refresh counts)."""
        ...

    @property
    def state(self) -> Dict[str, mx.array]:
        """The arrays to save (safetensors), sliced to what is really held."""
        ...

    @property
    def nbytes(self) -> int:
        """Bytes of memory really held by this layer's cache."""
        ...

    # Optional, as in mlx-lm's caches: `is_trimmable() -> bool` and `trim(n)`,
    # forgetting the last n tokens so that the cache is what it would be had
    # they never been fed (a chat whose template re-renders the last turn
    # trims back instead of reading the conversation again). A policy that
    # has dropped or merged tokens cannot, and leaves them out.


def trimmable(cache) -> bool:
    """Whether every layer of `cache` can forget its last tokens exactly."""
    return all(getattr(layer, "is_trimmable", lambda: False)() for layer in cache)


def rotate(rope: Optional[Rope], x: mx.array, offset: int) -> mx.array:
    """x rotated to positions offset, offset+1, ...; unchanged when rope is None."""
    return x if rope is None else rope(x, offset=offset)
