"""PaTH attention: position encoded by accumulated data-dependent Householder-like transforms.

PaTH (Yang et al. 2025, "PaTH Attention: Position Encoding via Accumulating
Householder Transformations", arXiv 2505.16381) replaces RoPE's fixed
rotation R^(i-j) by a product of per-token matrices

    H_t = I - beta_t w_t w_t^T,   beta_t = 2 * sigmoid(u^T x_t + b) in (0, 2),
    w_t = L2Norm(SiLU(ShortConv_3(W_up W_down x_t))),  per head, in the head dimension,

where x_t is the attention layer's input (GPT-2: the output of ln_1). Order
convention, as in the paper (eq. for A_ij):

    score(i, j) = k_j^T (H_{j+1} H_{j+2} ... H_i) q_i = q_i^T (H_i ... H_{j+2} H_{j+1}) k_j,   j <= i,

i.e. key j is acted on first by H_{j+1} (the token right after it), last by
H_i (the query's own token); j = i gives plain q_i . k_i. This is what makes
decoding a rank-one update per new token t of every cached key,
k_j <- H_t k_j = k_j - beta_t (w_t . k_j) w_t. H_t is symmetric; it is
orthogonal (a reflection) only at beta_t = 2, and for beta_t in (0, 2) its
eigenvalue along w_t is 1 - beta_t in (-1, 1), so products contract.

The low-rank projection (rank 32), the depthwise causal convolution of
kernel 3 with SiLU, the L2 normalisation and beta = 2 sigmoid(linear) follow
the authors' reference layer (fla-org/flash-linear-attention,
fla/layers/path_attn.py); as there, the default initialisation of the beta
projection gives beta_t close to 1 at the start of training (PyTorch's
default Linear init with a bias; w is scale-free because of the
normalisation). No rotary is applied on top by default (`rotary=True` adds
RoPE to q and k before the transform).

Implementations here:

* `path_scores_reference`: the recurrence with explicit Householder matrices,
  O(T^2 d^2), for tests.
* `path_scores`: blockwise with the UT transform. Within a block of C tokens
  H_s H_{s+1} ... H_e = I - W^T A W with A = (I + diag(beta) striu(W W^T))^-1 diag(beta)
  (one unit-triangular solve per block); intra-block scores, queries carried
  to the start of their block and keys carried to the end of theirs come out
  of C x C matrix products; across blocks the queries are carried leftwards
  one block transform at a time, so the whole thing costs O(T^2 d + T C d + T C^2)
  in pure PyTorch. Scores are explicit (B, H, T_q, T_k): the transform does
  not factorise into per-token queries and keys, so
  F.scaled_dot_product_attention cannot be used; the sdpa and eager paths
  both run softmax(scale * scores + mask) @ v, the eager one also returns the
  probabilities.

Getting x_t: attention functions only see q, k, v, so each `PaTH` installs a
forward pre-hook on its `GPT2Attention` (`PaTH.install(attn)`, or
`install(model)` for a whole patched model) that hands it the layer input and
the cache object of the call.

Decoding: GPT-2's cache holds raw keys. Each `PaTH` keeps, per cache object
(a weak-keyed dictionary, so interleaved caches do not clash and a dropped
cache frees its state), the keys transformed up to the last token seen and
the convolution's last 2 inputs. A call with no past (T_q == T_k) starts a
fresh state; a call with a past continues the state of its cache (one token:
one rank-one update; several tokens, i.e. chunked prefill: the blockwise
algorithm with the carried keys as a block before the chunk). The carried
keys are materialised lazily, only when a continuation asks for them, so
plain eval forwards with `use_cache=True` pay nothing. State is kept in eval
mode only (training forwards make a throwaway cache) and is detached from
the autograd graph. Cache reordering (beam search) and left padding inside
the convolution window are not handled: a padded token still feeds the
convolution of the next two real tokens.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .base import PositionEncoding
from .registry import register_encoding
from .rotary import Rotary

DEFAULT_RANK = 32        # low-rank width of the w projection, as in the authors' layer
DEFAULT_BLOCK = 64       # block size C of the UT-transform algorithm
CONV_KERNEL = 3          # short causal convolution over time
# rad^2: a `transform_drift` mean above this falsifies "PaTH's transforms are stable past the training length"
DRIFT_FALSIFIER = 0.05


# ---------------------------------------------------------------- the maths


def householders(w: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """H_t = I - beta_t w_t w_t^T as explicit matrices: (..., T, D) and (..., T) -> (..., T, D, D)."""
    eye = torch.eye(w.shape[-1], dtype=w.dtype, device=w.device)
    return eye - beta[..., None, None] * w[..., :, None] * w[..., None, :]


def path_scores_reference(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """score[i, j] = q_i^T (H_i ... H_{j+1}) k_j for j <= i, 0 above the diagonal.

    q, k, w: (..., T, D); beta: (..., T). Plain recurrence with explicit
    Householder matrices: before query i reads the keys, every earlier key is
    multiplied by the matrix H_i; key i joins untransformed. O(T^2 D^2).
    """
    length = q.shape[-2]
    H = householders(w, beta)
    keys = k[..., :0, :]
    rows = []
    for i in range(length):
        keys = torch.cat([keys @ H[..., i, :, :].transpose(-1, -2), k[..., i:i + 1, :]], dim=-2)  # rows (H_i k_j)^T
        row = (keys @ q[..., i, :, None]).squeeze(-1)  # (..., i + 1)
        rows.append(F.pad(row, (0, length - i - 1)))
    return torch.stack(rows, dim=-2)


def ut_factor(w: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """A (..., C, C), upper triangular, with H_0 H_1 ... H_{C-1} = I - W^T A W.

    A = (I + diag(beta) striu(W W^T))^-1 diag(beta) (the UT transform); any
    contiguous range s..e of the block has H_s ... H_e = I - W_r^T A_r W_r
    with A_r the matching diagonal sub-block of A.
    """
    size = w.shape[-2]
    eye = torch.eye(size, dtype=w.dtype, device=w.device)
    unit_upper = eye + beta[..., :, None] * (w @ w.transpose(-1, -2)).triu(1)
    return torch.linalg.solve_triangular(unit_upper, torch.diag_embed(beta), upper=True, unitriangular=True)


def _apply_to_rows(x, w, a, transpose: bool):
    """Rows x^T times (I - W^T A W) (transpose=False) or times (I - W^T A^T W) (transpose=True)."""
    a = a.transpose(-1, -2) if transpose else a
    return x - ((x @ w.transpose(-1, -2)) @ a) @ w


@dataclass
class _CarriedKeys:
    """What is needed to carry every key to the end of a chunk, computed only on demand."""

    past: torch.Tensor | None  # (N, P, D), already carried to the chunk's start
    keys: torch.Tensor          # (N, nb, C, D): each key carried to the end of its own block
    w: torch.Tensor             # (N, nb, C, D)
    a: torch.Tensor             # (N, nb, C, C)
    length: int                 # real tokens in the chunk (the rest of the last block is padding)

    def materialise(self) -> torch.Tensor:
        """(N, P + length, D): key j times H_last ... H_{j+1}."""
        carried = self.past
        if carried is None:
            carried = self.keys.new_zeros(self.keys.shape[0], 0, self.keys.shape[-1])
        for c in range(self.keys.shape[1]):
            carried = _apply_to_rows(carried, self.w[:, c], self.a[:, c], transpose=False)  # (B_c k)^T = k^T B_c^T
            carried = torch.cat([carried, self.keys[:, c]], dim=1)
        return carried[:, :carried.shape[1] - (self.keys.shape[1] * self.keys.shape[2] - self.length)]


def _path_scores_blockwise(q, k, w, beta, block_size, past):
    """Flattened core of `path_scores`: q, k, w (N, T, D), beta (N, T), past (N, P, D) or None."""
    n, length, dim = q.shape
    size = max(1, min(block_size, length))
    nb = -(-length // size)
    pad = nb * size - length
    if pad:  # padded steps have beta = 0, i.e. H = I, and sit after every real token
        q, k, w = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, w))
        beta = F.pad(beta, (0, pad))
    qb, kb, wb = (t.reshape(n, nb, size, dim) for t in (q, k, w))
    a = ut_factor(wb, beta.reshape(n, nb, size))                   # (N, nb, C, C)

    wq = (wb @ qb.transpose(-1, -2)).triu(0)                       # [b, i] = w_b . q_i, b <= i
    kw = (kb @ wb.transpose(-1, -2)).triu(1)                       # [j, a] = k_j . w_a, a > j
    kwa = kw @ a
    keys = kb - kwa @ wb                                           # k_j carried to its block's end
    queries = qb - (a @ wq).transpose(-1, -2) @ wb                 # rows q_i^T H_i ... H_start
    intra = (qb @ kb.transpose(-1, -2) - (kwa @ wq).transpose(-1, -2)).tril()

    scores = intra.new_zeros(n, nb * size, nb * size)
    tiles = scores.view(n, nb, size, nb, size)                     # [query block, row, key block, column]
    tiles.diagonal(0, 1, 3).copy_(intra.permute(0, 2, 3, 1))
    full = [queries[:, :1]]                                        # queries carried to the chunk's start
    moving = queries[:, 1:]                                        # blocks d.. carried over d - 1 block transforms
    for d in range(1, nb):                                         # key block = query block - d
        tiles.diagonal(-d, 1, 3).copy_((moving @ keys[:, :nb - d].transpose(-1, -2)).permute(0, 2, 3, 1))
        if d < nb - 1 or past is not None:
            moving = _apply_to_rows(moving, wb[:, :nb - d], a[:, :nb - d], transpose=True)
            full.append(moving[:, :1])
            moving = moving[:, 1:]
    scores = scores[:, :length, :length]
    if past is not None:
        carried_queries = torch.cat(full, dim=1).reshape(n, nb * size, dim)[:, :length]
        scores = torch.cat([carried_queries @ past.transpose(-1, -2), scores], dim=-1)
    return scores, _CarriedKeys(past, keys, wb, a, length)


def path_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    beta: torch.Tensor,
    block_size: int = DEFAULT_BLOCK,
    past_keys: torch.Tensor | None = None,
    return_keys: bool = False,
):
    """PaTH scores, blockwise (UT transform); same values as `path_scores_reference`.

    q, k, w: (..., T, D), beta: (..., T). `past_keys` (..., P, D) are keys of
    earlier tokens already carried to the end of the past (k_j times
    H_{P-1} ... H_{j+1}); they come first in the key axis. Returns scores
    (..., T, P + T) with 0 where key > query, and with `return_keys` also
    every key carried to the end of this chunk, (..., P + T, D), ready to be
    `past_keys` of the next chunk.
    """
    lead = q.shape[:-2]
    flat = lambda t: t.reshape(-1, *t.shape[len(lead):])  # noqa: E731
    past = flat(past_keys) if past_keys is not None else None
    scores, carried = _path_scores_blockwise(flat(q), flat(k), flat(w), flat(beta), block_size, past)
    scores = scores.reshape(*lead, *scores.shape[1:])
    if not return_keys:
        return scores
    keys = carried.materialise()
    return scores, keys.reshape(*lead, *keys.shape[1:])


def path_attention(q, k, v, w, beta, scaling=None, block_size: int = DEFAULT_BLOCK, reference: bool = False):
    """softmax(scale * PaTH scores, causal) @ v for a sequence with no past: (..., T, D_v)."""
    scaling = q.shape[-1] ** -0.5 if scaling is None else scaling
    scores = path_scores_reference(q, k, w, beta) if reference else path_scores(q, k, w, beta, block_size)
    length = q.shape[-2]
    future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
    return torch.softmax((scores * scaling).masked_fill(future, float("-inf")), dim=-1) @ v


# ---------------------------------------------------------------- the encoding


@dataclass
class _DecodeState:
    carried: _CarriedKeys | None  # pending: keys not yet carried to the end
    keys: torch.Tensor | None     # (B, H, P, D) carried to the last token seen
    conv: torch.Tensor            # (B, kernel - 1, H * D): the convolution's last inputs
    length: int
    batch: int
    heads: int

    def carried_keys(self) -> torch.Tensor:
        if self.keys is None:
            flat = self.carried.materialise()
            self.keys = flat.reshape(self.batch, self.heads, *flat.shape[1:])
            self.carried = None
        return self.keys


class PaTH(PositionEncoding):
    """Per-layer PaTH: parameters for w_t and beta_t, the attention, and the decoding state."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        rank: int = DEFAULT_RANK,
        block_size: int = DEFAULT_BLOCK,
        kernel_size: int = CONV_KERNEL,
        activation: str | None = "silu",
        rotary: bool = False,
        rope_base: float = 10000.0,
    ):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden size {hidden_size} is not a multiple of {num_heads} heads")
        if activation not in (None, "silu"):
            raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
        if kernel_size < 1 or block_size < 1 or rank < 1:
            raise ValueError("rank, block_size and kernel_size must be positive")
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        width = num_heads * self.head_dim
        self.rank, self.block_size, self.kernel_size, self.activation = rank, block_size, kernel_size, activation
        self.w_down = nn.Linear(hidden_size, rank, bias=False)
        self.w_up = nn.Linear(rank, width, bias=False)
        self.w_conv = nn.Conv1d(width, width, kernel_size, groups=width, bias=False)  # depthwise; run causally
        self.beta_proj = nn.Linear(hidden_size, num_heads)  # default init: beta = 2 sigmoid(.) starts near 1
        self.rope = Rotary(self.head_dim, base=rope_base) if rotary else None
        self._pending = None  # (layer input, cache) handed over by the pre-hook
        self._states = weakref.WeakKeyDictionary()
        self._capture: list | None = None

    # -- getting the layer input

    def install(self, attn_module: nn.Module) -> None:
        """Register the forward pre-hook that hands this encoding `attn_module`'s input. Idempotent."""
        if any(hook == self._take_layer_input for hook in attn_module._forward_pre_hooks.values()):
            return
        attn_module.register_forward_pre_hook(self._take_layer_input, with_kwargs=True)

    def _take_layer_input(self, module, args, kwargs):
        if getattr(module, "position_encoding", None) is not self:
            return None  # the layer has since been given another encoding
        hidden = args[0] if args else kwargs.get("hidden_states")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None and len(args) > 1:
            cache = args[1]
        self._pending = (hidden, cache)
        return None

    def _layer_input(self, module, length: int):
        if self._pending is None:
            raise RuntimeError(
                f"PaTH in attention layer {getattr(module, 'layer_idx', '?')} did not receive the layer input: "
                "its forward pre-hook is missing; call mempos.encodings.path.install(model) after apply_encoding"
            )
        hidden, cache = self._pending
        self._pending = None
        if hidden is None or hidden.shape[1] != length:
            raise RuntimeError(f"PaTH got a layer input of shape {tuple(hidden.shape)} for {length} queries")
        return hidden, cache

    # -- w_t and beta_t

    def transform_inputs(self, hidden: torch.Tensor, conv_state: torch.Tensor | None = None):
        """w (B, H, T, D) unit vectors, beta (B, H, T) in (0, 2), and the convolution's new state.

        `conv_state` (B, kernel - 1, H * D) holds the projections of the
        previous tokens (zeros at the start of a sequence).
        """
        batch, length, _ = hidden.shape
        u = self.w_up(self.w_down(hidden))
        if conv_state is None:
            conv_state = u.new_zeros(batch, self.kernel_size - 1, u.shape[-1])
        joined = torch.cat([conv_state.to(u.dtype), u], dim=1)
        mixed = F.conv1d(joined.transpose(1, 2), self.w_conv.weight, groups=u.shape[-1]).transpose(1, 2)
        if self.activation == "silu":
            mixed = F.silu(mixed)
        w = F.normalize(mixed.view(batch, length, self.num_heads, self.head_dim), dim=-1, eps=1e-6).transpose(1, 2)
        beta = 2 * torch.sigmoid(self.beta_proj(hidden)).transpose(1, 2)
        return w, beta, joined[:, joined.shape[1] - (self.kernel_size - 1):]

    # -- attention

    def reset_state(self) -> None:
        self._states = weakref.WeakKeyDictionary()

    def attend(self, module, query, key, value, attention_mask, q_pos, k_pos, eager: bool, **kwargs):
        batch, heads, length, dim = query.shape
        past = key.shape[2] - length
        hidden, cache = self._layer_input(module, length)
        state = None
        if past > 0:
            state = self._states.get(cache) if cache is not None else None
            if state is None or state.length != past or state.batch != batch:
                raise RuntimeError(
                    f"PaTH has no decoding state for this cache with {past} past tokens and batch {batch} "
                    "(states are kept in eval mode, per cache object, from a call without past)"
                )
        dtype = torch.promote_types(query.dtype, torch.float32)
        w, beta, conv_state = self.transform_inputs(hidden, state.conv if state is not None else None)
        q, k_new = query, key[:, :, past:]
        if self.rope is not None:
            q, k_new = self.rope.rotate(q, k_new, q_pos, k_pos[:, past:])
        q, k_new, w, beta = q.to(dtype), k_new.to(dtype), w.to(dtype), beta.to(dtype)
        keep = cache is not None and not self.training

        if state is not None and length == 1:  # one decoding step: k_j <- k_j - beta_t (w_t . k_j) w_t
            with torch.no_grad():  # out of place: the previous step's graph may still hold the old keys
                carried = state.carried_keys()
                carried = carried - beta[..., None] * (carried @ w.transpose(-1, -2)) * w
            keys = torch.cat([carried, k_new], dim=2)
            scores = q @ keys.transpose(-1, -2)
            new_state = _DecodeState(None, keys.detach(), conv_state.detach(), past + 1, batch, heads)
        else:
            past_keys = state.carried_keys() if state is not None else None
            flat = lambda t: t.reshape(batch * heads, *t.shape[2:])  # noqa: E731
            scores, carried = _path_scores_blockwise(
                flat(q), flat(k_new), flat(w), flat(beta), self.block_size,
                flat(past_keys) if past_keys is not None else None,
            )
            scores = scores.view(batch, heads, length, past + length)
            new_state = None
            if keep:
                pending = _CarriedKeys(*(t.detach() if t is not None else None for t in
                                         (carried.past, carried.keys, carried.w, carried.a)), carried.length)
                new_state = _DecodeState(pending, None, conv_state.detach(), past + length, batch, heads)
        if keep:
            self._states[cache] = new_state
        if self._capture is not None:
            self._capture.append((w.detach(), beta.detach()))

        scaling = kwargs.get("scaling")
        scores = scores * (dim ** -0.5 if scaling is None else scaling)
        if attention_mask is not None:
            mask = attention_mask[..., -scores.shape[-1]:]
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores + mask.to(scores.dtype)
        rows = torch.arange(length, device=query.device)[:, None] + past
        scores = scores.masked_fill(torch.arange(past + length, device=query.device) > rows, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(value.dtype)
        probs = F.dropout(probs, p=kwargs.get("dropout", 0.0), training=module.training)
        output = (probs @ value).transpose(1, 2).contiguous()
        return output, (probs if eager else None)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, head_dim={self.head_dim}, rank={self.rank}, "
                f"block_size={self.block_size}, kernel={self.kernel_size}, rotary={self.rope is not None}")


def path_encodings(model) -> list[PaTH]:
    """The PaTH encodings of a patched GPT-2, layer by layer."""
    return [block.attn.position_encoding for block in model.transformer.h
            if isinstance(getattr(block.attn, "position_encoding", None), PaTH)]


def install(model):
    """Give every PaTH layer of `model` its input hook (idempotent); returns the model."""
    for block in model.transformer.h:
        encoding = getattr(block.attn, "position_encoding", None)
        if isinstance(encoding, PaTH):
            encoding.install(block.attn)
    return model


@register_encoding(
    "path",
    "PaTH, score q_i^T H_i...H_{j+1} k_j, H_t = I - beta_t w_t w_t^T from token t's input "
    "(Yang et al. 2025, arXiv 2505.16381)",
)
def build(config, rank: int = DEFAULT_RANK, block_size: int = DEFAULT_BLOCK, rotary: bool = False,
          rope_base: float = 10000.0, kernel_size: int = CONV_KERNEL, activation: str | None = "silu"):
    return PaTH(config.n_embd, config.n_head, rank=rank, block_size=block_size, kernel_size=kernel_size,
                activation=activation, rotary=rotary, rope_base=rope_base)


# ---------------------------------------------------------------- drift of the accumulated transform


@contextlib.contextmanager
def capture_transforms(model):
    """Collect (w, beta) of every PaTH layer for the forwards run inside the block: a list per layer."""
    encodings = path_encodings(model)
    captured = [[] for _ in encodings]
    for encoding, store in zip(encodings, captured):
        encoding._capture = store
    try:
        yield captured
    finally:
        for encoding in encodings:
            encoding._capture = None


def accumulated_angles(w: torch.Tensor, beta: torch.Tensor, probes: torch.Tensor, train_len: int) -> torch.Tensor:
    """Angles (..., P, T - train_len) between P_{train_len-1} v and P_t v for t >= train_len.

    w (..., T, D), beta (..., T), probes (P, D). P_t = H_t H_{t-1} ... H_0
    (H_0 acts first). Directions are renormalised after every step (a
    linear map's direction does not depend on the scale of its input), so
    the contraction of beta < 2 cannot underflow; a probe mapped exactly to
    0 gives NaN from then on.
    """
    length = w.shape[-2]
    if not 1 <= train_len < length:
        raise ValueError(f"need 1 <= train_len < sequence length, got {train_len} and {length}")
    w, beta = w.double(), beta.double()
    v = probes.double().expand(*w.shape[:-2], *probes.shape).clone()  # (..., P, D)
    v = F.normalize(v, dim=-1)
    anchor, angles = None, []
    for t in range(length):
        wt = w[..., t, None, :]
        v = v - beta[..., t, None, None] * (v * wt).sum(-1, keepdim=True) * wt
        norm = v.norm(dim=-1, keepdim=True)
        v = torch.where(norm > 1e-300, v / norm, torch.full_like(v, math.nan))
        if t == train_len - 1:
            anchor = v
        elif t >= train_len:
            angles.append(torch.arccos((v * anchor).sum(-1).clamp(-1.0, 1.0)))
    return torch.stack(angles, dim=-1)


@dataclass
class TransformDrift:
    """Result of `transform_drift`; `per_head[l][h]` and `per_layer[l]` in rad^2."""

    per_layer: list[float]
    per_head: list[list[float]]
    mean: float
    train_len: int
    eval_len: int
    n_probes: int
    falsifier: float = DRIFT_FALSIFIER
    undefined: float = 0.0  # fraction of angles left out because a probe was mapped to 0
    definition: str = field(default=(
        "mean over chunks, probes and t in [train_len, eval_len) of the squared angle between "
        "P_{train_len-1} v and P_t v, P_t = H_t ... H_0, v fixed random unit probes"))

    @property
    def exceeds_falsifier(self) -> bool:
        return self.mean > self.falsifier


@torch.no_grad()
def transform_drift(model, chunks: torch.Tensor, train_len: int, eval_len: int, n_probes: int = 16,
                    batch_size: int = 8, seed: int = 0) -> TransformDrift:
    """How far the accumulated PaTH transform moves past the training length.

    Definition: for each layer l and head h, each chunk (token ids, the
    first `eval_len` of each row; needle data in the experiment) and each of
    `n_probes` fixed unit vectors v in the head dimension (seeded normal,
    normalised), let P_t = H_t H_{t-1} ... H_0 be the transform accumulated
    through position t (a key at position -1 would meet query t through it)
    and theta_t(v) = angle(P_{train_len-1} v, P_t v) for t in [train_len,
    eval_len). The drift of (l, h) is the mean of theta_t(v)^2 over chunks,
    probes and t: the angular variance, about the direction reached at the
    training length, of the probes' directions beyond it, in rad^2. It is 0
    when the transforms beyond the training window leave the directions
    where they were (e.g. all beta = 0); random directions in high dimension
    give about (pi/2)^2. `per_layer` averages heads, `mean` averages layers;
    compare `mean` with `DRIFT_FALSIFIER`.
    """
    encodings = path_encodings(model)
    if not encodings:
        raise ValueError("model has no PaTH layers; apply_encoding(model, 'path') first")
    chunks = torch.as_tensor(chunks)
    if chunks.dim() != 2 or chunks.shape[1] < eval_len:
        raise ValueError(f"chunks must be (N, >= {eval_len}) token ids, got shape {tuple(chunks.shape)}")
    dim = encodings[0].head_dim
    probes = torch.randn(n_probes, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(encodings), encodings[0].num_heads, dtype=torch.float64)
    counts = torch.zeros_like(sums)
    undefined = 0
    try:
        for start in range(0, chunks.shape[0], batch_size):
            batch = chunks[start:start + batch_size, :eval_len].to(device)
            with capture_transforms(model) as captured:
                model(batch, use_cache=False)
            for layer, ((w, beta),) in enumerate(captured):
                squared = accumulated_angles(w, beta, probes.to(w.device), train_len).cpu() ** 2  # (B, H, P, T')
                finite = torch.isfinite(squared)
                undefined += int((~finite).sum())
                sums[layer] += torch.where(finite, squared, 0.0).sum(dim=(0, 2, 3))
                counts[layer] += finite.sum(dim=(0, 2, 3))
    finally:
        model.train(was_training)
    per_head = (sums / counts.clamp_min(1)).tolist()
    per_layer = [sum(row) / len(row) for row in per_head]
    total = float(counts.sum()) + undefined
    return TransformDrift(per_layer, per_head, sum(per_layer) / len(per_layer), train_len, eval_len, n_probes,
                          undefined=undefined / total if total else 0.0)
