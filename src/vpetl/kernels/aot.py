"""Compile the Triton kernels ahead of time for an NVIDIA GPU target, on a machine without one.

The interpreter (``TRITON_INTERPRET=1``) checks the kernels' arithmetic but not what only the
GPU compiler rejects: a ``tl.dot`` layout it cannot lower, a ptxas error, a tile configuration
needing more shared memory than the device has. Triton compiles for a named target with the
ptxas its wheel ships, so :func:`record_launches` runs the real forward and backward of
:class:`~vpetl.kernels.patt_triton.PattProjection` / ``AdapterAdd`` (and the grouped
:class:`~vpetl.kernels.grouped_triton.GroupedPattProjection`) with every kernel launch
recorded instead of run (on CPU tensors: nothing executes), and :func:`compile_launch` compiles
one recorded launch to PTX and a cubin exactly as ``JITFunction.run`` would on that GPU
(Triton's own argument specialisation: 16-byte alignment, stride-1 constants).

Used by ``tests/test_kernels_compile.py`` and ``benchmarks/kernels_compile.py``. It relies on
Triton 3.x launch internals (``create_function_from_signature``, ``JITFunction._pack_args``);
:func:`aot_supported` says whether they are there.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Iterator

import torch

# largest dynamic shared memory one block may opt into, bytes (cudaDevAttrMaxSharedMemoryPerBlockOptin)
SHARED_LIMIT = {90: 232448, 80: 166912}

# Register spill (stack bytes per thread) a kernel may show before a test calls its tiles wrong.
# How much a tile spills depends on the ptxas and Triton release pip picked (the fp32 backward
# tile once used at r = 64 spilled 0 B with Triton 3.9 and 24 B with 3.8 on sm_90): a few dozen
# bytes are the compiler's choice and cost little; tiles too large for the register file spilled
# kilobytes (5.5-17 KB before the tiles were chosen from the report). The exact figures per
# release are reported by benchmarks/kernels_compile.py.
SPILL_LIMIT = 256


def aot_supported() -> str | None:
    """None when ahead-of-time compilation works here, else the reason it does not."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1: the kernels are decorated for the interpreter in this process"
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource, make_backend  # noqa: F401
        from triton.runtime.jit import create_function_from_signature  # noqa: F401
    except ImportError as error:
        return f"Triton's compile internals are not where Triton 3.x keeps them ({error})"
    from . import patt_triton

    if patt_triton._interpreting():
        return "the kernels were decorated for the interpreter in this process"
    return None


def target(arch: int):
    """The CUDA target for compute capability ``arch`` (90: H100, 80: A100)."""
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


@dataclass
class Launch:
    """One recorded launch: the JIT kernel, its arguments and, for an autotuned kernel, the
    tile configurations the autotuner would try."""

    kernel: object
    args: tuple
    kwargs: dict
    configs: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.kernel.__name__

    def variants(self) -> list[dict]:
        """Keyword arguments of each configuration (the launch's own for a fixed kernel)."""
        if not self.configs:
            return [dict(self.kwargs)]
        return [{**self.kwargs, **c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
                for c in self.configs]


@contextlib.contextmanager
def record_launches() -> Iterator[list[Launch]]:
    """Within the block, launches of the kernels (single-task and grouped) are appended to the
    yielded list and not run (outputs stay uninitialised)."""
    from . import grouped_triton as gt
    from . import patt_triton as pt

    launches: list[Launch] = []

    def recorder(kernel, configs=()):
        def run(*args, grid=None, warmup=False, **kwargs):
            launches.append(Launch(kernel, args, kwargs, list(configs)))
        return run

    class Tuned:  # stands in for the autotuned launcher, pruning as the autotuner would
        def __init__(self, name: str):
            self.kernel = {"project": pt._project_kernel, "dx": pt._dx_kernel}[name]
            self.column = pt._COLUMN_BLOCK[name]
            self.configs = pt._gemm_configs(*(("BN", "BK") if name == "project" else ("BK", "BN")))

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                named = dict(zip(self.kernel.arg_names, args))
                recorder(self.kernel, pt.prune_configs(self.configs, named, self.column))(*args, **kwargs)
            return run

    fixed = (pt._hidden_kernel, pt._branch_bwd_kernel, gt._grouped_hidden_kernel, gt._grouped_project_kernel,
             gt._grouped_branch_bwd_kernel, gt._grouped_dx_kernel)
    saved_launcher = pt._launcher
    for kernel in fixed:
        kernel.run = recorder(kernel)  # instance attribute shadows JITFunction.run
    pt._launcher = Tuned
    try:
        yield launches
    finally:
        pt._launcher = saved_launcher
        for kernel in fixed:
            del kernel.run


def patt_launches(dtype: torch.dtype, rank: int, act: str = "tanh", tokens: int = 394, d: int = 768) -> list[Launch]:
    """Launches of PATT's forward and backward on K/V of a ``d``-wide qkv projection
    (``tokens`` rows; defaults: ViT-B, two images)."""
    from . import patt_triton as pt

    x = torch.randn(tokens, d, dtype=dtype, requires_grad=True)
    weight, bias = torch.randn(3 * d, d, dtype=dtype), torch.randn(3 * d, dtype=dtype)
    params = [torch.randn(rank, d, dtype=dtype), torch.randn(rank, dtype=dtype),
              torch.randn(2 * d, rank, dtype=dtype), torch.randn(2 * d, dtype=dtype)]
    rows = torch.cat([torch.full((d,), -1), torch.arange(2 * d)]).to(torch.int32)
    slots = pt.SlotMap(rows=rows, cols=torch.arange(d, 3 * d, dtype=torch.int32))
    with record_launches() as launches:
        out = pt.patt_project(x, weight, bias, *[p.requires_grad_() for p in params], slots, 0.1, act)
        out.backward(torch.ones_like(out))
    return launches


def adapter_launches(dtype: torch.dtype, rank: int, act: str = "relu", tokens: int = 394, d: int = 768) -> list[Launch]:
    """Launches of the Triton adapter's forward and backward beside a ``d``-wide MLP."""
    from . import patt_triton as pt

    c = torch.randn(tokens, d, dtype=dtype, requires_grad=True)
    x = torch.randn(tokens, d, dtype=dtype, requires_grad=True)
    params = [torch.randn(rank, d, dtype=dtype), torch.randn(rank, dtype=dtype),
              torch.randn(d, rank, dtype=dtype), torch.randn(d, dtype=dtype)]
    with record_launches() as launches:
        out = pt.adapter_add(c, x, *[p.requires_grad_() for p in params], 0.1, act)
        out.backward(torch.ones_like(out))
    return launches


def grouped_launches(dtype: torch.dtype, rank: int, act: str = "tanh", tasks: int = 8, images: int = 8,
                     tokens: int = 197, d: int = 768) -> list[Launch]:
    """Launches of the grouped PATT's forward and backward for ``tasks`` tasks on K/V of a
    ``d``-wide qkv projection, ``images`` samples of ``tokens`` rows routed round-robin with
    every third sample on the plain base (defaults: ViT-B, 8 tasks)."""
    from . import grouped_triton as gt
    from . import patt_triton as pt

    x = torch.randn(images * tokens, d, dtype=dtype, requires_grad=True)
    weight, bias = torch.randn(3 * d, d, dtype=dtype), torch.randn(3 * d, dtype=dtype)
    params = [torch.randn(tasks, rank, d, dtype=dtype), torch.randn(tasks, rank, dtype=dtype),
              torch.randn(tasks, 2 * d, rank, dtype=dtype), torch.randn(tasks, 2 * d, dtype=dtype)]
    rows = torch.cat([torch.full((d,), -1), torch.arange(2 * d)]).to(torch.int32)
    slots = pt.SlotMap(rows=rows, cols=torch.arange(d, 3 * d, dtype=torch.int32))
    runs = [(-1 if i % 3 == 2 else i % tasks, i * tokens, (i + 1) * tokens) for i in range(images)]
    seg = gt.segments(runs, tasks, 64, torch.device("cpu"))
    scales = torch.full((tasks,), 0.8)
    with record_launches() as launches:
        out = gt.grouped_patt_project(x, weight, bias, *[p.requires_grad_() for p in params], scales, slots, seg, act)
        out.backward(torch.ones_like(out))
    return launches


def compile_launch(launch: Launch, arch: int, variant: int = 0):
    """Compile configuration ``variant`` of ``launch`` for ``sm_<arch>``: Triton's CompiledKernel
    (``.asm["ptx"]``, ``.asm["cubin"]``, ``.metadata.shared`` in bytes)."""
    import triton
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    gpu = target(arch)
    kwargs = launch.variants()[variant]
    backend = make_backend(gpu)
    binder = create_function_from_signature(launch.kernel.signature, launch.kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = launch.kernel._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=gpu,
                          options=options.__dict__)


def resource_usage(compiled) -> dict[str, int]:
    """Registers per thread, stack and local (spill) bytes of a compiled kernel, read from its
    cubin with the ``cuobjdump`` Triton ships (empty if that tool is missing)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        text = subprocess.run([tool, "-res-usage", cubin.name], capture_output=True, text=True, check=True).stdout
    usage = {}
    for line in text.splitlines():
        if "REG:" in line:
            for item in line.split():
                key, _, value = item.partition(":")
                if key in ("REG", "STACK", "LOCAL") and value.isdigit():
                    usage[key.lower()] = int(value)
    return usage
