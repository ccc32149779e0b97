"""CIFAR-10 on one process (CPU, or one GPU) with DistributedShampoo, SGD or Adam.

Runs with plain python or under torchrun with one process:

    python examples/default_cifar10_example.py --optimizer-type DISTRIBUTED_SHAMPOO \\
        --lr 1e-3 --beta2 0.999 --epsilon 1e-12 --grafting-type ADAM --grafting-epsilon 1e-8 \\
        --precondition-frequency 50 --epochs 1
    torchrun --standalone --nproc_per_node=1 examples/default_cifar10_example.py --synthetic

See --help for every optimizer flag, checkpointing (--checkpoint-dir) and metrics (--metrics-csv).
"""

import trainer_utils as tu
from runtime_setup import set_seed, setup_runtime


def main() -> None:
    args = tu.build_parser(__doc__).parse_args()
    runtime = setup_runtime(args, distributed=False)
    set_seed(args.seed)
    model = tu.ConvNet(args.model_width).to(runtime.device)
    optimizer = tu.instantiate_optimizer(args, model, distributed_config=None)
    tu.train_model(args, runtime, model, optimizer)


if __name__ == "__main__":
    main()
