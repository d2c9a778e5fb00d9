"""Find a model's classification head (trainable by default in every method but "full").

timm names it in ``pretrained_cfg["classifier"]`` (``"head"``, ``"head.fc"``, or a tuple
for distilled models); torchvision calls it ``heads`` (ViT) or ``head`` (Swin, Swin3D,
MViT); HF ``*ForImageClassification`` / ``*ForVideoClassification`` call it ``classifier``.
A model without one (``num_classes=0``, a bare backbone) simply has no head.
"""

from __future__ import annotations

from torch import nn

ROOT_HEAD_NAMES = ("head", "heads", "classifier", "fc")


def _module_with_params(model: nn.Module, path: str) -> bool:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return False
    return any(True for _ in module.parameters())


def find_head_paths(model: nn.Module) -> tuple[str, ...]:
    """Module paths of the classification head(s); empty if the model has none."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("classifier"):
        names = cfg["classifier"]
        names = (names,) if isinstance(names, str) else tuple(names)
        return tuple(n for n in names if _module_with_params(model, n))
    for name in ROOT_HEAD_NAMES:
        if _module_with_params(model, name):
            return (name,)
    return ()
