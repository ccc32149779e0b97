"""CIFAR-10 with HSDP (FSDP v1 HYBRID_SHARD over a 2-D (replicate, shard) device mesh) and
DistributedShampoo(distributed_config=HSDPShampooConfig): parameters are sharded along the
shard dimension, and Shampoo's blocks spread DDP-style over the replicate dimension.

    torchrun --standalone --nproc_per_node=4 examples/hsdp_cifar10_example.py \\
        --replicate-degree 2 --optimizer-type DISTRIBUTED_SHAMPOO --lr 1e-3 --beta2 0.999 \\
        --grafting-type ADAM --precondition-frequency 50

The mesh is (--replicate-degree, world size / --replicate-degree); on CPU it is built with
init_device_mesh("cpu", ...) and gloo, on CUDA with nccl.
"""

import trainer_utils as tu
from runtime_setup import cleanup, set_seed, setup_runtime
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import ShardingStrategy

from distributed_shampoo.shampoo_types import HSDPShampooConfig
from distributed_shampoo.utils.shampoo_fsdp_utils import compile_fsdp_parameter_metadata


def main() -> None:
    parser = tu.build_parser(__doc__)
    parser.add_argument(
        "--replicate-degree",
        type=int,
        default=2,
        help="size of the mesh's replicate dimension (default 2); the shard "
        "dimension gets the rest of the ranks",
    )
    args = parser.parse_args()
    runtime = setup_runtime(args, distributed=True)
    if args.replicate_degree < 1 or runtime.world_size % args.replicate_degree:
        raise SystemExit(
            f"--replicate-degree {args.replicate_degree} must divide the {runtime.world_size} ranks"
        )
    if runtime.world_size == args.replicate_degree:
        tu.logger.warning(
            "a shard dimension of size 1: FSDP replaces HYBRID_SHARD by NO_SHARD "
            "(use more processes, or a smaller --replicate-degree)"
        )
    mesh = init_device_mesh(
        runtime.device.type,
        (args.replicate_degree, runtime.world_size // args.replicate_degree),
        mesh_dim_names=("replicate", "shard"),
    )
    set_seed(args.seed)
    model = FSDP(
        tu.ConvNet(args.model_width).to(runtime.device),
        device_mesh=mesh,
        sharding_strategy=ShardingStrategy.HYBRID_SHARD,
        device_id=runtime.device,
        use_orig_params=True,
    )
    optimizer = tu.instantiate_optimizer(
        args,
        model,
        distributed_config=HSDPShampooConfig(
            device_mesh=mesh,
            param_to_metadata=compile_fsdp_parameter_metadata(model),
            communication_dtype=args.communication_dtype,
            num_trainers_per_group=args.num_trainers_per_group,
            communicate_params=args.communicate_params,
        ),
    )
    try:
        tu.train_model(args, runtime, model, optimizer)
    finally:
        cleanup()


if __name__ == "__main__":
    main()
