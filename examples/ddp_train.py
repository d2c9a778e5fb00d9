"""Data-parallel training of an injected model with PyTorch DDP, launched by torchrun.

    torchrun --standalone --nproc_per_node=2 examples/ddp_train.py --steps 20 --out delta.safetensors

The pattern, in four lines that matter:

1. ``vpetl.inject`` on every rank *before* wrapping in DDP (same seed, so same branch init);
2. ``DistributedDataParallel(model)``: DDP only registers parameters with ``requires_grad``,
   so the frozen base gets no gradient buckets and no all-reduce, and every branch is used
   in forward, so ``find_unused_parameters`` stays False;
3. the optimizer gets the trainable parameters only;
4. ``vpetl.save_delta(model, path)`` on rank 0 only, then a barrier (the file is small and
   written atomically; other ranks must not write the same path).

Runs on CPU with the gloo backend (as in the test) or on GPUs with nccl. Synthetic data with
a fixed seed: every step draws one global batch and each rank takes its contiguous shard, so
the run equals single-process training on the global batch (DDP averages gradients).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import safetensors.torch
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import vpetl


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(args.seed)  # identical base and branch init on every rank
    model = timm.create_model(
        args.model, pretrained=False, num_classes=args.classes, img_size=args.img_size, **_tiny(args)
    )
    return vpetl.inject(model, args.method, d_bottle=args.d_bottle)


def _tiny(args: argparse.Namespace) -> dict:
    return dict(patch_size=8, depth=2, embed_dim=32, num_heads=2) if args.tiny else {}


def global_batch(step: int, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(10_000 + step)
    images = torch.randn(args.global_batch, 3, args.img_size, args.img_size, generator=generator)
    labels = torch.randint(0, args.classes, (args.global_batch,), generator=generator)
    return images, labels


def parse_args(doc: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--tiny", action="store_true", help="2 blocks, width 32 (for tests)")
    parser.add_argument("--method", default="bapat")
    parser.add_argument("--d-bottle", type=int, default=None)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("delta.safetensors"))
    parser.add_argument("--dump-rank-deltas", type=Path, default=None,
                        help="also write every rank's delta tensors to DIR/rank<r>.safetensors (for tests)")
    return parser.parse_args()


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """The optimizer over the trainable parameters only (the frozen base is left out)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "adamw":
        return torch.optim.AdamW(trainable, lr=args.lr)
    return torch.optim.SGD(trainable, lr=args.lr, momentum=0.9)


def train(forward, optimizer, args: argparse.Namespace, rank: int, world: int, device: torch.device) -> None:
    """``args.steps`` steps; each rank trains on its contiguous shard of the global batch."""
    local = args.global_batch // world
    for step in range(args.steps):
        images, labels = global_batch(step, args)
        shard = slice(rank * local, (rank + 1) * local)
        loss = F.cross_entropy(forward(images[shard].to(device)), labels[shard].to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step}: loss {loss.item():.4f} (rank 0 shard)")


def main() -> None:
    args = parse_args(__doc__)

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} must be divisible by the {world} processes")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")

    model = build_model(args).to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)
    train(ddp, make_optimizer(model, args), args, rank, world, device)

    if rank == 0:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        vpetl.save_delta(model, args.out)  # rank 0 only; the others wait at the barrier
        print(f"saved {args.out} ({args.out.stat().st_size / 1e3:.1f} kB)")
    if args.dump_rank_deltas is not None:
        args.dump_rank_deltas.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in vpetl.delta_state_dict(model).items()}
        safetensors.torch.save_file(tensors, str(args.dump_rank_deltas / f"rank{rank}.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
