"""vpetl: parameter-efficient transfer learning for vision transformers (V-PETL, PATT, BAPAT)."""

from .config import (
    PATT,
    VPT,
    Activation,
    Adapter,
    AdapterConfig,
    AdapterPlacement,
    BranchDtype,
    InjectConfig,
    Kernel,
    LoRA,
    LoraConfig,
    PattConfig,
    PattVariant,
    Prefix,
    PrefixConfig,
    PromptConfig,
    Tune,
    TunePosition,
)
from .presets import METHODS, preset
from .registry import REGISTRY, Method
from .errors import (
    BaseWeightsWarning,
    ConfigError,
    DeltaFileError,
    DeltaMismatchError,
    ExportError,
    InjectionError,
    MergeError,
    VpetlError,
)
from .disable import disabled
from .delta import delta_state_dict, load_delta, save_delta
from .inject import inject, verify
from .merge import merge, unload
from .multitask import route, tasks
from .summary import Summary, summary

__version__ = "0.1.0"

__all__ = [
    "Method", "REGISTRY", "route", "tasks",
    "Activation", "AdapterConfig", "AdapterPlacement", "BaseWeightsWarning", "BranchDtype", "ConfigError", "DeltaFileError",
    "DeltaMismatchError", "ExportError", "InjectConfig", "InjectionError", "Kernel", "LoraConfig", "METHODS",
    "MergeError", "PattConfig", "PattVariant", "PrefixConfig", "PromptConfig", "Summary", "TunePosition", "VpetlError", "__version__", "delta_state_dict", "disabled", "inject",
    "load_delta", "merge", "preset", "save_delta", "summary", "unload", "verify",
]

# Every registered method entry by its class name (vpetl.PATT, vpetl.SSF, vpetl.FactTK, ...): adding a
# method is one file in vpetl/methods, with no line to add here.
globals().update({cls.__name__: cls for cls in REGISTRY.values()})
__all__ += sorted(cls.__name__ for cls in REGISTRY.values())
