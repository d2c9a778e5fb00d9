"""Shape (c): ``nn.MultiheadAttention`` (torchvision ViT's ``EncoderBlock``) and
``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` / ``nn.TransformerDecoderLayer``.

``nn.MultiheadAttention`` never calls a projection module: its forward reads
``in_proj_weight`` (``(3E, E)``, rows ``[W_q; W_k; W_v]``) and ``in_proj_bias`` itself, and
``out_proj`` is only a holder for a weight. In eval mode with a frozen base it takes a
native kernel (``torch._native_multi_head_attention``). So the module keeps its Parameters
(every key stays: ``in_proj_weight``, ``in_proj_bias``, ``out_proj.*``) and its class is
swapped for :class:`VpetlMultiheadAttention`, whose forward always runs in Python:

    [Q | K | V] = x W_in^T + b_in  (+ branches)      x: (N, L, E) or (L, N, E) or (L, E)
    PATT  (kv):  h = tanh(x W_down^T + b_down)                    (..., r)
                 K += s (h W_up[k]^T + b_up[k]),  V += s (h W_up[v]^T + b_up[v])
    LoRA  (qv):  Q += scale x A_q^T B_q^T,        V += scale x A_v^T B_v^T
    heads:       Q, K, V -> (N, H, L|S, E/H)
    attention:   A = softmax(Q K^T / sqrt(E/H) + M),  O = dropout(A) V     (N, H, L, E/H)
    output:      out_proj(concat_heads(O))                                 same layout as x

``M`` merges ``attn_mask`` (``(L, S)`` or ``(N*H, L, S)``) and ``key_padding_mask``
(``(N, S)``); bool masks mean ``True`` = masked out (``-inf``), float masks are added.
``is_causal``, ``batch_first``, unbatched input, ``dropout`` (training only),
``need_weights`` / ``average_attn_weights``, ``add_bias_kv`` and ``add_zero_attn`` behave as in
``nn.MultiheadAttention``. With ``need_weights=False`` the attention runs in
``F.scaled_dot_product_attention``; with ``need_weights=True`` it is computed explicitly so the
weights ``A`` can be returned (averaged over heads ``(N, L, S)``, or per head ``(N, H, L, S)``).
``out_proj`` *is* called as a module here (the original only reads its weight), so hooks on it
now fire. Not supported: ``kdim``/``vdim`` different from ``embed_dim`` (separate
``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` of different input widths; one PATT
down-projection cannot read all of them) -- :class:`~vpetl.errors.InjectionError`.

Prefix-tuning and PATT ``concat`` (:mod:`vpetl.handlers._extra_keys`) extend K and V along
the token axis after the head split, before ``add_bias_kv``'s and ``add_zero_attn``'s tokens::

    K' = [P_k | K | s K_p],  V' = [P_v | V | s V_p]          (N, H, S', E/H)

``P`` (prefix, ``L`` keys shared by the batch) is prepended; ``s K_p`` (one key per key-input
token, computed from ``key``, and ``s V_p`` from ``value``) is appended. ``attn_mask`` and
``key_padding_mask`` are extended to ``S'`` columns: allowed (0 / ``False``) for the prefix
keys, the source token's column for appended keys (a padded token's extra key is masked too).
``is_causal`` is then applied through that extended mask, not SDPA's flag. With
``need_weights`` the returned weights cover all ``S'`` keys in that order (prefix keys first,
the input's keys, then the appended ones), ``(N, L, S')`` or ``(N, H, L, S')``.

Self-attention (``query is key is value``) is one projection with slots ``qkv``. For
cross-attention each distinct input is projected with its rows of ``in_proj_weight`` (``q``
alone, and ``kv`` fused when ``key is value``), so branches still add into K and V, and PATT's
``h`` is computed from the input that feeds K and V (the memory), as Eq. 9 reads.

``nn.TransformerEncoderLayer`` has its own fast path (``torch._transformer_encoder_layer_fwd``,
eval mode and no grad or a frozen base) that never calls ``self_attn.forward``, so branches
would silently be skipped. The handler therefore claims the *layer* as the attention site
(its branches are named ``<layer>.vpetl_patt``) and swaps the layer's class for
:class:`VpetlTransformerEncoderLayer`, whose forward always takes the regular path
(``norm_first`` or post-norm, activation, dropouts, ``src_mask``, ``src_key_padding_mask``,
``is_causal``). The adapter (Eq. 6-7) reads the feed-forward input ``y`` and is added to its
output: ``x + ff(y) + s * up(relu(down(y)))``, ``y = norm2(x)`` when ``norm_first``, else
``y = x`` and the sum goes through ``norm2`` as usual. One subclass serves both PATT and the
adapter; its ``_ff_block`` adds ``vpetl_adapter`` when the layer has one, and the class is
swapped once, by whichever of the two is wired first.

``nn.TransformerEncoder`` has a second fast path: in eval mode with a ``src_key_padding_mask``
it turns its input into a *nested tensor* and hands that to every layer. The walker only ever
sees the layer, not the encoder, so instead of patching the encoder (``use_nested_tensor``),
the adapted layer accepts nested input itself: it pads it (``key_padding_mask`` marks the
padding), runs the regular path, and returns a nested tensor of the original lengths. The
encoder then pads the result with zeros exactly as its fast path does, so outputs match the
original, and a user who feeds nested tensors to a layer directly is covered as well. The
cost is computing the padding positions that the fused kernel would skip.

``nn.TransformerDecoderLayer`` has no fast path; its two attentions are plain
``nn.MultiheadAttention`` sites, and the adapter is placed the same way (beside ``_ff_block``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import scripting
from ..branches import Branch, ProjectionBranch
from ..derived import Derived, derived_class
from ..errors import InjectionError
from ..options import Kernel
from ..projection import KERNEL_ATTR, SlotLayout, project
from ..record import InjectionRecord
from ..tracing import raise_not_scriptable
from ._attention_math import additive_mask, attend, causal_mask, merge_masks, renest, unnest
from ._extra_keys import EXTRA_KV_ATTR, extend_keys, extend_mask
from ._mha_script import multihead_attention
from .base import AttentionHandler, ProjectionSpec
from .mlp import MLP_LOCATORS, MlpSite

BRANCHES_ATTR = "_vpetl_branches"  # plain attribute (no state-dict keys) on the adapted attention
LETTERS = "qkv"


# --------------------------------------------------------------------------- attention


class _BranchedAttention(Derived):
    """Forward of ``nn.MultiheadAttention`` with branches added into Q/K/V (see module docs)."""

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        if torch.jit.is_scripting():  # vpetl.handlers._mha_script
            return multihead_attention(
                query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal,
                self.in_proj_weight, self.in_proj_bias, self.out_proj.weight, self.out_proj.bias, self.num_heads,
                self.batch_first, self.dropout, self.training, self._vpetl_script_tensors, self._vpetl_script_ints,
            )
        return self._vpetl_eager_forward(
            query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
        )

    @torch.jit.unused
    def _vpetl_eager_forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor],
        need_weights: bool,
        attn_mask: Optional[Tensor],
        average_attn_weights: bool,
        is_causal: bool,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        return branched_attention_forward(
            self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
        )

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script``: the branches as the plan :func:`multihead_attention` reads."""
        extra_kv = self.__dict__.get(EXTRA_KV_ATTR, ())
        if self.bias_k is not None or self.add_zero_attn or not self._qkv_same_embed_dim:
            raise_not_scriptable(self)
        if len(extra_kv) > 1 or any(b.kind != "prefix" for b in extra_kv):
            raise_not_scriptable(self)
        branches = getattr(self, BRANCHES_ATTR, ())
        tensors, counts, ints = [self.in_proj_weight.new_zeros(0)], [], []
        for letter in LETTERS:
            letter_tensors, letter_ints = scripting.projection_plan(
                [b for b in branches if letter in b.positions], SlotLayout(letter), self.embed_dim)
            tensors += letter_tensors
            ints += letter_ints
            counts.append(len(letter_ints) // scripting.RECORD_INTS)
        prefix = [1, *scripting.prefix_plan(extra_kv[0])[1]] if extra_kv else [0, 0, 0]
        if extra_kv:
            tensors += scripting.prefix_plan(extra_kv[0])[0]
        scripting.store_plan(self, tensors, counts + prefix + ints)
        return self

    def _forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
        need_weights: bool,
        attn_mask: Tensor | None,
        average_attn_weights: bool,
        is_causal: bool,
    ) -> tuple[Tensor, Tensor | None]:
        if query.is_nested or key.is_nested or value.is_nested:
            return self._nested_forward(query, key, value, key_padding_mask, need_weights, attn_mask, is_causal)
        batched = query.dim() == 3
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                f"{type(self).__name__} expects query, key and value all 3D (batched) or all 2D (unbatched); "
                f"got {query.dim()}D, {key.dim()}D, {value.dim()}D."
            )
        q, k, v = (self._split_heads(t, batched) for t in self._project_qkv(query, key, value))
        batch, heads, length, source_length = q.shape[0], self.num_heads, q.shape[2], k.shape[2]
        extra_kv = self.__dict__.get(EXTRA_KV_ATTR, ())

        padding = additive_mask(key_padding_mask, q.dtype)
        if padding is not None and not batched:
            padding = padding.unsqueeze(0)
        mask = additive_mask(attn_mask, q.dtype)
        # As nn.MultiheadAttention: the is_causal hint replaces the mask only when SDPA can
        # apply it alone (no padding mask, no weights wanted); otherwise the mask is used.
        sdpa_causal = is_causal and padding is None and not need_weights and not extra_kv
        if sdpa_causal:
            mask = None
        elif is_causal and mask is None:
            mask = causal_mask(length, source_length, q.dtype, q.device)

        if extra_kv:  # prefix / PATT concat keys, before add_bias_kv's and add_zero_attn's
            k, v, layout = extend_keys(
                k, v, self._batch_major(key, batched), self._batch_major(value, batched), extra_kv
            )
            mask = None if mask is None else extend_mask(mask, layout, allowed=0.0)
            padding = None if padding is None else extend_mask(padding, layout, allowed=0.0)
            source_length = layout.total
        k, v, extra = self._extra_keys(k, v)
        if extra:
            mask = None if mask is None else _pad_last(mask, extra)
            padding = None if padding is None else _pad_last(padding, extra)
            source_length += extra
        merged = merge_masks(mask, padding, batch, heads, length, source_length)
        out, weights = attend(
            q, k, v, merged,
            is_causal=sdpa_causal,
            need_weights=need_weights,
            average_attn_weights=average_attn_weights,
            dropout_p=self.dropout if self.training else 0.0,
        )
        # (L, N, E) rows in memory, as the stock module: dropout after it draws the same masks.
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(length, batch, self.embed_dim))
        if not batched:
            return out.squeeze(1), (None if weights is None else weights.squeeze(0))
        return (out.transpose(0, 1) if self.batch_first else out), weights

    def _project_qkv(self, query: Tensor, key: Tensor, value: Tensor) -> list[Tensor]:
        """Q, K, V ``(..., E)`` in the inputs' layout; each *distinct* input tensor is projected
        once, with the rows of ``in_proj_weight`` of the consecutive letters it feeds."""
        groups: list[tuple[Tensor, str]] = []
        for letter, tensor in zip(LETTERS, (query, key, value)):
            if groups and groups[-1][0] is tensor:
                groups[-1] = (tensor, groups[-1][1] + letter)
            else:
                groups.append((tensor, letter))
        branches: tuple[ProjectionBranch, ...] = getattr(self, BRANCHES_ATTR, ())
        width = self.embed_dim
        outputs: list[Tensor] = []
        for tensor, letters in groups:
            if tensor.shape[-1] != width:
                raise ValueError(
                    f"{type(self).__name__} expects inputs of width embed_dim={width}; the input feeding "
                    f"{letters!r} has width {tensor.shape[-1]}."
                )
            rows = slice(LETTERS.index(letters[0]) * width, (LETTERS.index(letters[-1]) + 1) * width)
            weight = self.in_proj_weight if len(letters) == 3 else self.in_proj_weight[rows]
            bias = self.in_proj_bias
            if bias is not None and len(letters) < 3:
                bias = bias[rows]
            users = [b for b in branches if set(b.positions) & set(letters)]
            projected = project(tensor, weight, bias, SlotLayout(letters), users,
                                self.__dict__.get(KERNEL_ATTR, Kernel.AUTO))
            outputs.extend(projected.split(width, dim=-1))
        return outputs

    def _batch_major(self, t: Tensor, batched: bool) -> Tensor:
        """An input ``(N, T, E)`` / ``(T, N, E)`` / ``(T, E)`` as ``(N, T, E)`` (a view)."""
        if not batched:
            return t.unsqueeze(0)
        return t if self.batch_first else t.transpose(0, 1)

    def _split_heads(self, t: Tensor, batched: bool) -> Tensor:
        """``(N, T, E)`` / ``(T, N, E)`` / ``(T, E)`` -> ``(N, H, T, E/H)`` (a view where possible)."""
        if not batched:
            t = t.unsqueeze(0)
        elif not self.batch_first:
            t = t.transpose(0, 1)
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def _extra_keys(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, int]:
        """Append the learned ``bias_k``/``bias_v`` token (``add_bias_kv``) and then a zero
        token (``add_zero_attn``) to K and V ``(N, H, S, E/H)``; returns how many were added."""
        extra = 0
        if self.bias_k is not None and self.bias_v is not None:
            shape = (1, self.num_heads, 1, self.head_dim)
            k = _cat_token(k, self.bias_k.reshape(shape).to(k.dtype))
            v = _cat_token(v, self.bias_v.reshape(shape).to(v.dtype))
            extra += 1
        if self.add_zero_attn:
            k, v = _cat_token(k, k.new_zeros(())), _cat_token(v, v.new_zeros(()))
            extra += 1
        return k, v, extra

    def extra_repr(self) -> str:
        branches = (*getattr(self, BRANCHES_ATTR, ()), *self.__dict__.get(EXTRA_KV_ATTR, ()))
        kinds = ", ".join(b.kind for b in branches)
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, branches=[{kinds}]"

    def _nested_forward(self, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal):
        """Nested self-attention input (what the native fast path accepts): pad, attend with a
        padding mask, return a nested output of the same lengths."""
        if not (query is key and key is value) or key_padding_mask is not None or attn_mask is not None:
            raise ValueError(
                f"{type(self).__name__} accepts a nested tensor only for self-attention (query is key is "
                "value) without masks, as nn.MultiheadAttention's fast path does; pad the input and pass "
                "key_padding_mask instead."
            )
        if need_weights or not self.batch_first:
            raise ValueError(
                f"{type(self).__name__} with a nested input needs batch_first=True and need_weights=False "
                f"(got batch_first={self.batch_first}, need_weights={need_weights})."
            )
        padded, padding, lengths = unnest(query)
        out, _ = self._forward(padded, padded, padded, padding, False, None, True, is_causal)
        return renest(out, lengths), None


def branched_attention_forward(module: _BranchedAttention, *args) -> tuple[Tensor, Tensor | None]:
    """``module._forward(*args)``. ``torch.fx`` treats ``nn.MultiheadAttention`` as a leaf (one
    graph node); this wrapped function makes the adapted module one node too, run eagerly when
    the graph runs, since its input checks and mask handling branch on tensor values."""
    return module._forward(*args)


torch.fx.wrap("branched_attention_forward")


def _cat_token(t: Tensor, token: Tensor) -> Tensor:
    """``t`` ``(N, H, S, d)`` with one more key position ``token`` (broadcast to ``(N, H, 1, d)``)."""
    return torch.cat([t, token.expand(t.shape[0], t.shape[1], 1, t.shape[3])], dim=2)


def _pad_last(mask: Tensor, count: int) -> Tensor:
    """An additive mask with ``count`` zero (= allowed) columns appended on the key axis."""
    return F.pad(mask, (0, count))


def attention_class(cls: type) -> type:
    """The adapted class for ``cls`` (``nn.MultiheadAttention`` or a subclass keeping its forward)."""
    if issubclass(cls, _BranchedAttention):
        return cls
    return derived_class(_BranchedAttention, cls)


VpetlMultiheadAttention = attention_class(nn.MultiheadAttention)


def plain_attention(module: nn.Module | None) -> bool:
    """True for an ``nn.MultiheadAttention`` whose forward is the stock one."""
    return isinstance(module, nn.MultiheadAttention) and type(module).forward is nn.MultiheadAttention.forward


def check_supported(attn: nn.MultiheadAttention) -> None:
    """Raise :class:`InjectionError` for options the adapted forward cannot reproduce."""
    if not attn._qkv_same_embed_dim:
        raise InjectionError(
            f"{type(attn).__name__}(embed_dim={attn.embed_dim}, kdim={attn.kdim}, vdim={attn.vdim}) has "
            "separate q/k/v projection weights of different input widths (kdim/vdim != embed_dim); PATT and "
            "LoRA need one input width for q, k and v, so vpetl cannot adapt it. Build it with "
            "kdim=vdim=embed_dim, or use method='adapter' (MLP adapters only)."
        )


# --------------------------------------------------------------------------- layers


class _AdaptedFeedForward(Derived):
    """``_ff_block(y) + vpetl_adapter(y)`` when the layer has an adapter (Eq. 7, parallel)."""

    def _ff_block(self, x: Tensor) -> Tensor:
        out = super()._ff_block(x)
        adapter = self._modules.get("vpetl_adapter")
        return out if adapter is None else adapter.add_to(out, x, self.__dict__.get(KERNEL_ATTR, Kernel.AUTO))


class _RegularPathEncoderLayer:
    """``nn.TransformerEncoderLayer.forward`` without its fused fast path (see module docs)::

        norm_first:  x = x + sa(norm1(x));  x = x + ff(norm2(x))
        post-norm:   x = norm1(x + sa(x));  x = norm2(x + ff(x))

    with ``sa`` = dropout1(self_attn(x, x, x)) and ``ff`` = dropout2(linear2(dropout(act(linear1(.))))).
    A nested input is padded, run, and returned nested (``nn.TransformerEncoder``'s fast path).
    """

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        if src.is_nested:
            if src_mask is not None or src_key_padding_mask is not None:
                raise ValueError(
                    f"{type(self).__name__} got a nested tensor and a mask; pass either a padded tensor with "
                    "src_key_padding_mask, or a nested tensor without masks."
                )
            padded, padding, lengths = unnest(src)
            return renest(self.forward(padded, None, padding, is_causal), lengths)
        # Same canonical (additive float) masks the stock layer hands its attention.
        src_key_padding_mask = additive_mask(src_key_padding_mask, src.dtype)
        src_mask = additive_mask(src_mask, src.dtype)
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x


class _RegularPathAdaptedLayer(_RegularPathEncoderLayer, _AdaptedFeedForward):
    """An encoder layer that always runs its regular path and may hold an adapter."""


def layer_class(cls: type) -> type:
    """The adapted class for an encoder/decoder layer class. An encoder layer that keeps the
    stock forward also loses its fast path; a subclass with its own forward keeps it."""
    if issubclass(cls, _AdaptedFeedForward):
        return cls
    if issubclass(cls, nn.TransformerEncoderLayer) and cls.forward is nn.TransformerEncoderLayer.forward:
        return derived_class(_RegularPathAdaptedLayer, cls)
    return derived_class(_AdaptedFeedForward, cls)


VpetlTransformerEncoderLayer = layer_class(nn.TransformerEncoderLayer)
VpetlTransformerDecoderLayer = layer_class(nn.TransformerDecoderLayer)


def _ensure_layer_class(layer: nn.Module, record: InjectionRecord) -> None:
    """Swap ``layer``'s class once, whether PATT or the adapter is wired first."""
    if not isinstance(layer, _AdaptedFeedForward):
        record.swap_class(layer, layer_class(type(layer)))


@dataclass
class LayerFeedForwardSite(MlpSite):
    """The inline feed-forward (linear1 -> activation -> dropout -> linear2) of an
    ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``: the adapter is registered
    on the layer as ``vpetl_adapter`` and added by the layer's ``_ff_block``."""

    def wire(self, adapter: Branch, record: InjectionRecord) -> None:
        record.add_module(self.module, "vpetl_adapter", adapter)
        record.set_attr(self.module, KERNEL_ATTR, record.config.kernel)
        _ensure_layer_class(self.module, record)


def locate_layer_feedforward(block: nn.Module, block_path: str) -> MlpSite | None:
    """An ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` block (MLP locator)."""
    if not isinstance(block, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return None
    linear1, linear2 = block._modules.get("linear1"), block._modules.get("linear2")
    if not (isinstance(linear1, nn.Linear) and isinstance(linear2, nn.Linear)):
        return None
    return LayerFeedForwardSite(block_path, block, linear1.in_features, linear2.out_features)


MLP_LOCATORS.append(locate_layer_feedforward)


# --------------------------------------------------------------------------- handler


def _attention_of(module: nn.Module) -> nn.MultiheadAttention:
    return module.self_attn if isinstance(module, nn.TransformerEncoderLayer) else module


class MultiheadAttentionHandler(AttentionHandler):
    """``nn.MultiheadAttention`` sites, and ``nn.TransformerEncoderLayer`` as a whole (its fast
    path would skip the attention's forward; the walker does not descend into a matched site)."""

    name = "multihead-attention"

    def match(self, module: nn.Module) -> bool:
        if isinstance(module, nn.TransformerEncoderLayer):
            return type(module).forward is nn.TransformerEncoderLayer.forward and plain_attention(
                module._modules.get("self_attn")
            )
        return plain_attention(module)

    def spec(self, module: nn.Module) -> ProjectionSpec:
        attn = _attention_of(module)
        check_supported(attn)
        width = attn.embed_dim
        weight = attn.in_proj_weight
        return ProjectionSpec(
            d_in=width,
            widths={c: width for c in LETTERS},
            bias=attn.in_proj_bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )

    def wire(self, module: nn.Module, branches: list[ProjectionBranch], record: InjectionRecord) -> None:
        attn = _attention_of(module)
        check_supported(attn)
        record.swap_class(attn, attention_class(type(attn)))
        record.set_attr(attn, BRANCHES_ATTR, tuple(branches))
        record.set_attr(attn, KERNEL_ATTR, record.config.kernel)
        if module is not attn:
            _ensure_layer_class(module, record)

    def wire_extra_keys(self, module: nn.Module, branches: list, record: InjectionRecord) -> None:
        """Prefix / PATT ``concat`` keys joined to K and V per head (module docs); the class is
        swapped unless :meth:`wire` already did, the branches go in ``_vpetl_extra_kv``."""
        attn = _attention_of(module)
        check_supported(attn)
        if not isinstance(attn, _BranchedAttention):
            record.swap_class(attn, attention_class(type(attn)))
        record.set_attr(attn, EXTRA_KV_ATTR, tuple(branches))
        if module is not attn:
            _ensure_layer_class(module, record)

    def weight_rows(self, module: nn.Module, letter: str) -> Tensor:
        """Rows ``[i*E, (i+1)*E)`` of ``in_proj_weight`` (a view, ``(E, E)``) for letter ``i``
        of "qkv"; ``vpetl.merge`` folds LoRA into them in place."""
        attn = _attention_of(module)
        return SlotLayout(LETTERS).rows(attn.in_proj_weight, letter)
