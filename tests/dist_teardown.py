"""Ending a spawned test rank's process group without the exit deadlock seen under load.

gloo's worker thread destroys a finished work (a barrier keeps the tensors of the works before
it) after the waiting rank has moved on, and that needs the GIL. If the process group's last
reference (a DDP reducer, a DTensor mesh) is then dropped while the main thread holds the GIL,
its destructor joins the worker thread: both wait forever. A last barrier and a pause without
the GIL let the worker finish first (examples/runtime_setup.py's cleanup does the same).
"""

import time

import torch.distributed as dist


def shutdown_process_group(clean: bool = True) -> None:
    """clean=False (a rank that failed): no barrier, which the other ranks may never reach."""
    if dist.is_initialized():
        if clean:
            dist.barrier()
            time.sleep(0.2)
        dist.destroy_process_group()
