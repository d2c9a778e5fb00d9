"""Sharded training (FSDP2, ``torch.distributed.fsdp.fully_shard``) of an injected model.

    torchrun --standalone --nproc_per_node=2 examples/fsdp2_train.py --steps 20 --out delta.safetensors

The recipe:

1. ``vpetl.inject`` on every rank before sharding (same seed: same branch init);
2. ``fully_shard`` each transformer block, then the root. A block holds frozen base weights
   and trainable branches side by side; FSDP2 shards both and reduces gradients only for the
   parameters that have them;
3. the optimizer gets the trainable parameters only (sharded DTensors);
4. to save, gather a full state dict (a collective: every rank calls it), load it into an
   unsharded injected model on rank 0 and call ``vpetl.save_delta`` there.

Data, model and flags are those of ``ddp_train.py`` (same synthetic global batches), so the
result equals single-process training on the global batch. Checked on CPU with gloo (the test
suite runs it with 2 processes); on GPUs the same script uses nccl.
"""

from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import vpetl
from ddp_train import build_model, make_optimizer, parse_args, train


def main() -> None:
    args = parse_args(__doc__)
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} must be divisible by the {world} processes")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,))

    full = train_sharded(args, mesh, rank, world, device)
    if rank == 0:
        plain = build_model(args)  # unsharded, injected the same way
        plain.load_state_dict(full)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        vpetl.save_delta(plain, args.out)
        print(f"saved {args.out} ({args.out.stat().st_size / 1e3:.1f} kB)")
    dist.barrier()
    gc.collect()  # gloo work objects held by the sharded model must go before the process group
    dist.destroy_process_group()


def train_sharded(args, mesh, rank: int, world: int, device: torch.device) -> dict:
    """Shard, train, and gather the full state dict (a collective: every rank calls it); the
    sharded model and its optimizer die with this frame, before the process group does."""
    model = build_model(args).to(device)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    train(model, make_optimizer(model, args), args, rank, world, device)
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


if __name__ == "__main__":
    main()
