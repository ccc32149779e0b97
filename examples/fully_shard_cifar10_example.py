"""CIFAR-10 with FSDP2 (fully_shard, DTensor parameters) and DistributedShampoo(
distributed_config=FullyShardShampooConfig()): each rank preconditions its local row shard.

    torchrun --standalone --nproc_per_node=2 examples/fully_shard_cifar10_example.py \\
        --optimizer-type DISTRIBUTED_SHAMPOO --lr 1e-3 --beta2 0.999 --grafting-type ADAM \\
        --precondition-frequency 50

--replicate-degree R > 1 shards over a 2-D (R, world size / R) mesh instead: replicated across
its first dimension, sharded along its second (FSDP2's hybrid sharding).
"""

import trainer_utils as tu
from runtime_setup import cleanup, set_seed, setup_runtime
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from distributed_shampoo.shampoo_types import FullyShardShampooConfig


def main() -> None:
    parser = tu.build_parser(__doc__)
    parser.add_argument(
        "--replicate-degree",
        type=int,
        default=1,
        help="1 (default): a 1-D mesh over all ranks; R > 1: a 2-D "
        "(replicate=R, shard=world/R) mesh",
    )
    args = parser.parse_args()
    runtime = setup_runtime(args, distributed=True)
    if args.replicate_degree < 1 or runtime.world_size % args.replicate_degree:
        raise SystemExit(
            f"--replicate-degree {args.replicate_degree} must divide the {runtime.world_size} ranks"
        )
    if args.replicate_degree == 1:
        mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    else:
        mesh = init_device_mesh(
            runtime.device.type,
            (args.replicate_degree, runtime.world_size // args.replicate_degree),
            mesh_dim_names=("replicate", "shard"),
        )
    set_seed(args.seed)
    model = tu.ConvNet(args.model_width).to(runtime.device)
    for layer in model.modules():  # each conv/linear layer its own unit, then the root
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = tu.instantiate_optimizer(args, model, distributed_config=FullyShardShampooConfig())
    try:
        tu.train_model(args, runtime, model, optimizer)
    finally:
        cleanup()


if __name__ == "__main__":
    main()
