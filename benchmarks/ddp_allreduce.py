"""Time one gradient all-reduce of DDP's size: ``torchrun --nproc_per_node=N benchmarks/ddp_allreduce.py PARAMS [REPS]``.

A float32 tensor of PARAMS elements (a fine-tune's trainable parameters, ``trainable_params`` in its result) is
all-reduced REPS times on the default group (gloo on the CPU, NCCL on GPUs); rank 0 prints the median seconds and
the bus bandwidth (NCCL's definition: 2 (N-1)/N x bytes / time). DDP sends the same bytes per optimizer step, in
25 MB buckets that overlap the backward pass; this number is the step's communication without any overlap.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from featx.distributed import from_environment


def main() -> None:
    params, reps = int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 10
    dist = from_environment()
    if dist is None:
        raise SystemExit("run under torchrun --nproc_per_node=N (N >= 2)")
    import torch.distributed as tdist

    x = torch.ones(params, dtype=torch.float32, device=dist.device)
    tdist.all_reduce(x)  # warm-up: connections, buffers
    times = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        tdist.all_reduce(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if dist.is_main:
        med = statistics.median(times)
        bus = 2 * (dist.world_size - 1) / dist.world_size * params * 4 / med / 1e9
        print(
            f"all-reduce of {params} float32 ({params * 4 / 1e6:.1f} MB) over {dist.world_size} ranks ({dist.backend}): "
            f"median {med * 1000:.1f} ms of {reps}, bus bandwidth {bus:.2f} GB/s"
        )
    dist.close()


if __name__ == "__main__":
    main()
