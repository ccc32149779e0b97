"""CIFAR-10 with DistributedDataParallel and DistributedShampoo(distributed_config=
DDPShampooConfig): Shampoo's blocks are spread over the ranks (of each group of
--num-trainers-per-group ranks) and their updates all-gathered in --communication-dtype.

    torchrun --standalone --nproc_per_node=2 examples/ddp_cifar10_example.py \\
        --optimizer-type DISTRIBUTED_SHAMPOO --lr 1e-3 --beta2 0.999 --grafting-type ADAM \\
        --precondition-frequency 50 --communication-dtype FP32

CUDA with nccl when a GPU is visible, else CPU with gloo (--device chooses).
"""

import trainer_utils as tu
from runtime_setup import cleanup, set_seed, setup_runtime
from torch.nn.parallel import DistributedDataParallel as DDP

from distributed_shampoo.shampoo_types import DDPShampooConfig


def main() -> None:
    args = tu.build_parser(__doc__).parse_args()
    runtime = setup_runtime(args, distributed=True)
    set_seed(args.seed)
    model = tu.ConvNet(args.model_width).to(runtime.device)
    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    model = DDP(model, device_ids=device_ids)
    optimizer = tu.instantiate_optimizer(
        args,
        model,
        distributed_config=DDPShampooConfig(
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
