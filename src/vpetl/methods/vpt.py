"""Visual prompt tuning (VPT, Jia et al. 2022): learned prompt tokens in the token sequence.

With ``x = [c, z]`` the input of the first block (``c``: the ``p`` prefix tokens -- CLS,
distillation, register tokens; ``z``: the ``N - p`` patch tokens; ``x`` is ``(B, N, d)``) and
``P_l`` the ``(L, d)`` prompts of block ``l``:

* shallow (``deep=False``): block 0 reads ``[c, P_0, z]`` (``(B, N + L, d)``); every later
  block reads what the previous one wrote, prompts included;
* deep (``deep=True``): block ``l > 0`` reads the previous output with its ``L`` prompt
  positions *replaced* by ``P_l``: ``[c', P_l, z']`` (Eq. 8; VPT's "deep" variant);
* after the last block the ``L`` prompt positions are dropped, so the final norm, the pooling
  (CLS token or mean of the patch tokens) and the head see the original ``(B, N, d)`` layout.

Prompts are parameters ``<block>.vpetl_prompt.tokens`` (``blocks.0.vpetl_prompt.tokens`` for
shallow, one per block for deep), initialised as VPT does: uniform in ``[-b, b]`` with
``b = sqrt(6 / (fan_in + d))``, ``fan_in = C * prod(patch size)`` of the patch embedding (the
first Conv2d / Conv3d with ``d`` output channels; ``d`` when there is none): for ViT-B/16
``b = sqrt(6 / (3 * 16 * 16 + 768)) = 0.0625``, VPT's value. Prompts get no position embedding
(they join after the embedding, as in VPT). Prompt dropout is the ``dropout`` option (0 by
default, as VPT's configs); VPT's optional prompt projection is not implemented.

The tokens are spliced in by forward pre-hooks on the blocks and cut out by a forward hook
on the last block; the hooks are bound methods of the prompt modules and logged in the
injection record (``vpetl.disabled`` and ``vpetl.unload`` remove them).

Blocks are the ancestors of the attention modules that sit in an ``nn.ModuleList`` /
``nn.Sequential`` (timm ``blocks.N``, torchvision ``encoder.layers.encoder_layer_N``, HF
``layers.N`` / ``encoder.layer.N``); they must all sit in one such list and take a batch-first
``(B, N, d)`` sequence as their first argument (HF layers may return a tuple: its first element
is the sequence). The prefix-token count ``p`` is timm's ``num_prefix_tokens`` (the first
module that has one); otherwise 1 if the model has a ``cls_token`` / ``class_token`` parameter
(torchvision, HF), plus the token count of a ``register_tokens`` parameter; otherwise 0.
Window attention (Swin, Video Swin), sequence-first ``nn.MultiheadAttention`` and token
pooling between blocks (MViT) are refused at inject time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from ..blocks import block_path_of
from ..branches import Branch
from ..errors import InjectionError
from ..options import flag, frozen_set, probability, width
from ..record import InjectionRecord
from ..registry import Method, register

if TYPE_CHECKING:
    from ..inject import Injection

PROMPT_NAME = "vpetl_prompt"
HIDDEN_NAMES = ("hidden_states", "x", "src", "input", "tgt")  # keyword names of a block's token input
_ALTERNATIVES = (
    "Use method 'prefix' (learned keys/values inside every attention, which also works with window "
    "attention) or 'bapat' / 'patt' instead; they leave the token sequence unchanged."
)

Rebuild = Callable[[Tensor], tuple[tuple[Any, ...], dict[str, Any]]]


@register
@dataclass(frozen=True)
class VPT(Method):
    """Visual prompt tuning (module docs): ``length`` learned tokens after the CLS (prefix)
    tokens; ``deep=False`` only before the first block, ``deep=True`` before every block (each
    block's prompts replace the previous ones). Prompts are removed after the last block.
    ``dropout`` is VPT's prompt dropout (its configs: 0.0 by default, 0.1 in some VTAB runs),
    applied to the prompts in training."""

    name: ClassVar[str] = "vpt"
    kind: ClassVar[str] = "prompt"
    paper: ClassVar[str] = "VPT (Jia et al. 2022)"
    formula: ClassVar[str] = "L*d shallow, L*d per block deep"
    width_field: ClassVar[None] = None
    why_not_mergeable: ClassVar[str] = "it adds tokens the base model does not have"

    length: int = 10
    deep: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        width(self.length, "prompt length")
        flag(self.deep, "prompt deep")
        frozen_set(self, "dropout", probability(self.dropout, "prompt dropout"))

    def attach(self, injection: Injection) -> None:
        """Prompt modules on the blocks (``<block>.vpetl_prompt``) and the hooks that splice them in."""
        sites = injection.attention_sites()
        for path, branch in add_prompts(injection.model, [s.path for s in sites], self, injection.record).items():
            injection.adopt(path, injection.place(branch, next(branch.parameters())))


PromptConfig = VPT  # the name before vpetl 0.2


class PromptTokens(Branch):
    """The ``L`` prompt tokens ``P (L, d)`` of one block.

    :meth:`insert` (a forward pre-hook on the block) turns its input ``x (B, N, d)`` into
    ``[x[:, :p], P, x[:, p:]]`` (``(B, N + L, d)``), or, with ``replace=True`` (deep prompts,
    blocks after the first), into ``[x[:, :p], P, x[:, p + L:]]`` (same shape).
    :meth:`remove` (a forward hook on the last block) returns ``[y[:, :p], y[:, p + L:]]``.
    """

    kind = "prompt"

    def __init__(self, length: int, width: int, prefix: int, fan_in: int, *, replace: bool, where: str = "",
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.tokens = nn.Parameter(torch.empty(length, width))
        bound = math.sqrt(6.0 / (fan_in + width))
        nn.init.uniform_(self.tokens, -bound, bound)
        self.prefix = prefix
        self.replace = replace
        self.where = where  # the block's path, for messages

    @property
    def length(self) -> int:
        return self.tokens.shape[0]

    def insert(self, block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        x, rebuild = self._hidden(block, args, kwargs)
        p, L = self.prefix, self.length
        need = p + L if self.replace else p
        self._check(block, x, need)
        self._mark_called()
        prompts = self.dropout(self.tokens.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1))
        rest = x[:, p + L :] if self.replace else x[:, p:]
        return rebuild(torch.cat([x[:, :p], prompts, rest], dim=1))

    def remove(self, block: nn.Module, args: tuple, output: Any) -> Any:
        y = output[0] if isinstance(output, (tuple, list)) else output
        p, L = self.prefix, self.length
        self._check(block, y, p + L, "returned")
        y = torch.cat([y[:, :p], y[:, p + L :]], dim=1)
        if isinstance(output, (tuple, list)):
            return type(output)([y, *output[1:]])
        return y

    def _hidden(self, block: nn.Module, args: tuple, kwargs: dict) -> tuple[Any, Rebuild]:
        """The block's token input and a function that puts a replacement in its place."""
        if args:
            x = args[0]
            others = [(f"positional argument {i}", v) for i, v in enumerate(args[1:], 1)]

            def rebuild(new: Tensor) -> tuple[tuple, dict]:
                return (new, *args[1:]), kwargs
        else:
            name = next((n for n in HIDDEN_NAMES if n in kwargs), None)
            if name is None:
                raise InjectionError(
                    f"{self.where} ({type(block).__name__}) was called without a token tensor: no positional "
                    f"argument and none of the keywords {', '.join(HIDDEN_NAMES)} (got {sorted(kwargs)}). "
                    f"VPT needs to see the block's (B, N, C) token sequence. {_ALTERNATIVES}"
                )
            x = kwargs[name]
            others = []

            def rebuild(new: Tensor) -> tuple[tuple, dict]:
                return args, {**kwargs, name: new}

        others += [(f"keyword {k!r}", v) for k, v in kwargs.items() if v is not x]
        extra = [(what, v) for what, v in others if isinstance(v, Tensor)]
        if extra:
            what, value = extra[0]
            raise InjectionError(
                f"{self.where} ({type(block).__name__}) also received a tensor ({what}, shape {tuple(value.shape)}), "
                f"e.g. an attention mask or position encoding sized for the original tokens, which VPT cannot "
                f"extend by its {self.length} prompt tokens. Call the model without it, or: {_ALTERNATIVES}"
            )
        return x, rebuild

    def _check(self, block: nn.Module, x: Any, need: int, verb: str = "received") -> None:
        width = self.tokens.shape[1]
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != width or x.shape[1] < need:
            found = f"a tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else f"a {type(x).__name__}"
            raise InjectionError(
                f"{self.where} ({type(block).__name__}) {verb} {found}; VPT needs a batch-first token sequence "
                f"(B, N, {width}) with at least {need} tokens. {_ALTERNATIVES}"
            )

    def extra_repr(self) -> str:
        return f"length={self.length}, prefix={self.prefix}, replace={self.replace}"


def add_prompts(
    model: nn.Module, attention_site_paths: list[str], config: VPT, record: InjectionRecord
) -> dict[str, Branch]:
    """Register prompt modules on the blocks holding ``attention_site_paths`` and hook them
    into forward (see the module docstring); returns ``{path: prompt module}``."""
    blocks = _blocks(model, attention_site_paths)
    for block_path, attention_path in blocks:
        reason = _not_a_sequence(model.get_submodule(block_path), model.get_submodule(attention_path))
        if reason:
            raise InjectionError(
                f"VPT cannot be added to this {type(model).__name__}: {block_path} "
                f"({type(model.get_submodule(block_path)).__name__}) {reason}. VPT inserts prompt tokens into "
                f"a batch-first (B, N, C) token sequence after the CLS token, so it needs blocks that take one. "
                f"{_ALTERNATIVES}"
            )
    blocks = _one_stack(model, blocks)
    first_attention = model.get_submodule(blocks[0][1])
    width = _token_width(first_attention, blocks[0][1])
    prefix = prefix_token_count(model)
    fan_in = _patch_fan_in(model, width)
    ref = next(first_attention.parameters())
    prompted = blocks if config.deep else blocks[:1]
    out: dict[str, Branch] = {}
    prompts: list[PromptTokens] = []
    for index, (block_path, _) in enumerate(prompted):
        block = model.get_submodule(block_path)
        prompt = PromptTokens(config.length, width, prefix, fan_in, replace=index > 0, where=block_path or "<root>",
                              dropout=config.dropout)
        prompt.to(device=ref.device, dtype=ref.dtype)
        record.add_module(block, PROMPT_NAME, prompt)
        record.add_hook(block, prompt.insert, pre=True, with_kwargs=True)
        out[_join(block_path, PROMPT_NAME)] = prompt
        prompts.append(prompt)
    record.add_hook(model.get_submodule(blocks[-1][0]), prompts[-1].remove, pre=False)
    return out


def _blocks(model: nn.Module, attention_site_paths: list[str]) -> list[tuple[str, str]]:
    """``(block path, first attention path)`` per block."""
    blocks: dict[str, str] = {}
    for path in attention_site_paths:
        block_path = block_path_of(model, path)
        if block_path is None:
            raise InjectionError(
                f"VPT found the attention {path or '<root>'} ({type(model.get_submodule(path)).__name__}) in no "
                "nn.ModuleList / nn.Sequential of blocks, so it cannot tell where the token sequence enters the "
                f"first block and leaves the last. {_ALTERNATIVES}"
            )
        blocks.setdefault(block_path, path)
    return list(blocks.items())


def _one_stack(model: nn.Module, blocks: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``blocks`` in forward order; raise unless they all sit in one list."""
    containers = sorted({p.rpartition(".")[0] for p, _ in blocks})
    if len(containers) > 1:
        raise InjectionError(
            f"VPT needs one stack of blocks that all see the same token sequence; this {type(model).__name__} has "
            f"attention blocks in {len(containers)} lists ({', '.join(c or '<root>' for c in containers[:6])}). "
            f"{_ALTERNATIVES}"
        )
    container = model.get_submodule(containers[0])
    order = {module: i for i, module in enumerate(container.children())}
    return sorted(blocks, key=lambda item: order[model.get_submodule(item[0])])


def _not_a_sequence(block: nn.Module, attention: nn.Module) -> str | None:
    """Why ``block`` does not take a (B, N, C) token sequence, or None."""
    mha = attention if isinstance(attention, nn.MultiheadAttention) else attention._modules.get("self_attn")
    if isinstance(mha, nn.MultiheadAttention) and not mha.batch_first:
        return (
            f"uses {type(mha).__name__} with batch_first=False, so its blocks take sequence-first (N, B, C) "
            "tensors"
        )
    name = type(attention).__name__
    if "Window" in name or any(hasattr(m, "shift_size") for m in (block, attention)):
        return (
            f"has window attention ({name}), whose blocks take a (B, H, W, C) or (B, T, H, W, C) feature grid, "
            "not a token sequence"
        )
    if any(getattr(attention, a, None) is not None for a in ("pool_q", "pool_k", "pool_v", "pool_kv")):
        return f"pools tokens inside its attention ({name}), so the token count changes from block to block"
    return None


def _token_width(attention: nn.Module, path: str) -> int:
    embed_dim = getattr(attention, "embed_dim", None)
    if isinstance(embed_dim, int) and not isinstance(embed_dim, bool):
        return embed_dim
    linear = next((m for m in attention.modules() if isinstance(m, nn.Linear)), None)
    if linear is None:
        raise InjectionError(
            f"VPT sizes its prompts by the width of the tokens entering {path} ({type(attention).__name__}), read "
            f"from an embed_dim attribute or its first nn.Linear; it has neither. {_ALTERNATIVES}"
        )
    return linear.in_features


def prefix_token_count(model: nn.Module) -> int:
    """Tokens before the patch tokens: timm's ``num_prefix_tokens``; else 1 for a
    ``cls_token`` / ``class_token`` parameter plus the tokens of a ``register_tokens`` one."""
    for module in model.modules():
        count = getattr(module, "num_prefix_tokens", None)
        if isinstance(count, int) and not isinstance(count, bool):
            return count
    has_class_token, registers = False, 0
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("cls_token", "class_token"):
            has_class_token = True
        elif leaf == "register_tokens" and param.dim() >= 2:
            registers += param.shape[-2]
    return int(has_class_token) + registers


def _patch_fan_in(model: nn.Module, width: int) -> int:
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Conv3d)) and module.out_channels == width:
            return module.in_channels // module.groups * math.prod(module.kernel_size)
    return width


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
