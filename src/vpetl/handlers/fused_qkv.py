"""Shape (a): one fused ``qkv`` Linear called as a module (timm ViT/DeiT/DINOv2/CLIP/Swin/
CaiT/XCiT/MViTv2/Hiera/MaxViT..., torchvision MViT) and shape (d) modules of timm that read
``qkv.weight`` themselves unless ``qkv_bias_separate`` is set (BEiT, EVA, SwinV2).

Output layout: position-major ``[3, H, hd]`` by default; head-major ``[H, 3, hd]`` when the
module says ``head_first`` (timm maxxvit's channels-last attention).
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from ..projection import SlotLayout, adoptable
from ..record import InjectionRecord
from .base import LinearProjections, ProjectionSpec


class FusedQkvHandler(LinearProjections):
    name = "fused-qkv"

    def match(self, module: nn.Module) -> bool:
        qkv = module._modules.get("qkv")
        return qkv is not None and adoptable(qkv) and qkv.out_features % 3 == 0

    def linears(self, module: nn.Module) -> list[tuple[str, SlotLayout]]:
        heads = int(getattr(module, "num_heads", 0)) if getattr(module, "head_first", False) is True else 0
        return [("qkv", SlotLayout("qkv", heads))]

    def spec(self, module: nn.Module) -> ProjectionSpec:
        spec = super().spec(module)
        return replace(spec, bias=spec.bias or getattr(module, "q_bias", None) is not None)

    def wire(self, module, branches, record: InjectionRecord) -> None:
        # timm BEiT/EVA/SwinV2 with q/v biases call F.linear(x, self.qkv.weight) and would
        # silently bypass the wrapper; with qkv_bias_separate they call self.qkv(x) instead.
        if getattr(module, "q_bias", None) is not None and hasattr(module, "qkv_bias_separate"):
            record.set_attr(module, "qkv_bias_separate", True)
        super().wire(module, branches, record)
