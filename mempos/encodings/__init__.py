"""Position encodings and the GPT-2 patch that installs them.

Nothing here knows about the agent or the memory: they hand positions in,
this layer turns them into rotations.
"""

from . import alibi, path, scale_invariant  # noqa: F401  (they register their encodings)
from .gpt2 import EAGER, SDPA, apply_encoding, eager_attention, encoding_name, is_patched
from .registry import ENCODINGS, EncodingSpec, get_encoding, register_encoding
from .base import PositionEncoding
from .rotary import Rotary, apply_rotary, inverse_frequencies, rotate_half
from .warps import WARPS, get_warp, register_warp

__all__ = [
    "EAGER", "SDPA", "ENCODINGS", "WARPS", "EncodingSpec", "PositionEncoding", "Rotary",
    "apply_encoding", "apply_rotary", "eager_attention", "encoding_name", "get_encoding",
    "get_warp", "inverse_frequencies", "is_patched", "register_encoding", "register_warp",
    "rotate_half",
]
