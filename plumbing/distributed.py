"""The process group: torchrun's (one process per GPU or CPU core), else a world of one, and the
all-reduces the run's statistics need.

    rank, world, device = setup_distributed("auto")     # train.py:run
    all_mean([episode successes], world)                # the mean over every process
    shutdown_distributed(world)                         # after main has returned
"""

import gc
import os

import torch
import torch.distributed as dist


def setup_distributed(device):
    """torchrun sets RANK/WORLD_SIZE; plain `python train.py` is a world of one."""
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if "RANK" not in os.environ:
        if use_cuda and device == "auto":
            name = "cuda"
        elif device == "auto":
            name = "cpu"
        else:
            name = device
        return 0, 1, torch.device(name)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return (dist.get_rank(), dist.get_world_size(),
            torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu"))


def shutdown_distributed(world):
    """Destroys torchrun's process group, after `main` has returned: the DistributedDataParallel
    wrapper, the other holder of the group, dies with main's frame while the group is still
    registered.

    The order matters. DDP's reducer holds the group from C++ and lets go of it with the GIL
    held; were it the last holder (the group already destroyed), gloo's destructor would wait,
    holding the GIL, for a worker thread that needs the GIL to free its last collective's
    tensors, and the process would never exit. Destroyed from Python, the group is freed with
    the GIL released."""
    if world == 1:
        return
    gc.collect()  # a reference cycle through the DDP wrapper would keep its reducer alive
    dist.barrier()  # no process tears down while another still waits in a collective
    dist.destroy_process_group()


def all_mean(values, world):
    """Mean of a list of floats over all processes (episode statistics, losses)."""
    t = torch.tensor([sum(values), len(values)], dtype=torch.float64)
    if world > 1:  # NCCL reduces GPU tensors only
        t = t.cuda() if dist.get_backend() == "nccl" else t
        dist.all_reduce(t)
    return (t[0] / t[1]).item() if t[1] > 0 else float("nan")
