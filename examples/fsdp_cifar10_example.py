"""CIFAR-10 with FSDP (v1, use_orig_params=True) and DistributedShampoo(distributed_config=
FSDPShampooConfig): each rank preconditions the pieces of the parameters in its own shard.

    torchrun --standalone --nproc_per_node=2 examples/fsdp_cifar10_example.py \\
        --optimizer-type DISTRIBUTED_SHAMPOO --lr 1e-3 --beta2 0.999 --grafting-type ADAM \\
        --precondition-frequency 50

CUDA with nccl when a GPU is visible, else CPU with gloo (--device chooses).
"""

import trainer_utils as tu
from runtime_setup import cleanup, set_seed, setup_runtime
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import ShardingStrategy

from distributed_shampoo.shampoo_types import FSDPShampooConfig
from distributed_shampoo.utils.shampoo_fsdp_utils import compile_fsdp_parameter_metadata


def main() -> None:
    args = tu.build_parser(__doc__).parse_args()
    runtime = setup_runtime(args, distributed=True)
    set_seed(args.seed)
    # The whole net is one FSDP unit: its flat parameter is cut into shards across parameter
    # boundaries, which FSDPShampooConfig's metadata maps back to the original shapes.
    model = FSDP(
        tu.ConvNet(args.model_width).to(runtime.device),
        sharding_strategy=ShardingStrategy.FULL_SHARD,
        device_id=runtime.device,
        use_orig_params=True,
    )
    optimizer = tu.instantiate_optimizer(
        args,
        model,
        distributed_config=FSDPShampooConfig(
            param_to_metadata=compile_fsdp_parameter_metadata(model)
        ),
    )
    try:
        tu.train_model(args, runtime, model, optimizer)
    finally:
        cleanup()


if __name__ == "__main__":
    main()
