"""What the benchmark scripts share: the device name, round-robin timing and peak memory."""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def device_name(device) -> str:
    """The GPU's name for a CUDA device, else the CPU model (from /proc/cpuinfo where it exists)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sync(device) -> None:
    """Wait for the GPU, so that wall-clock times cover the work (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def round_robin_median(runs: dict, device, warmup: int, repeats: int) -> dict:
    """Median wall-clock seconds of each zero-argument callable in ``runs``. The callables take
    turns, so that a slow spell of a shared machine does not fall on one of them only."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    sync(device)
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


#: The goals printed beside the memory-limit ratios of the kernel benchmarks (see copy_unit).
COPIES_GOAL = 8        # an arithmetic-only (elementwise or row-wise) kernel, in copies
PLAIN_GOAL = 1.5       # a kernel against the plain torch operation of the same shape


def scan_copies_goal(steps: int) -> float:
    """The copies goal of a log-depth scan over ``steps`` time steps: 2 log2 T."""
    return 2 * math.log2(steps)


def copy_unit(x):
    """The memory-bandwidth unit of a kernel benchmark, as a zero-argument callable: one
    ``clone()`` of the tensor ``x`` (the kernel's main input), or, when ``x`` is a list or tuple,
    a copy of every tensor into buffers allocated once (for an optimizer, whose step updates the
    parameters in place: a fresh clone of tens of MiB of parameters would time the allocator's
    page faults, not the memory). A copy reads and writes each element once, so it is the least
    time a kernel that must read its input and write a result of that size can take.

    Time it in the same ``round_robin_median`` run as the kernel; "copies" = kernel time / this
    time (goal ``COPIES_GOAL`` = 8 for an arithmetic-only kernel, ``scan_copies_goal(T)`` =
    2 log2 T for a log-depth scan over T steps). Autograd is off for the clone."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        return lambda: x.clone()
    xs = [t.detach() for t in x]
    dst = [torch.empty_like(t) for t in xs]

    def copy_all():
        for d, t in zip(dst, xs):
            d.copy_(t)
    return copy_all


def cuda_peak_bytes(run, device) -> int:
    """How far CUDA memory rose above what was allocated before one call of ``run`` (after a warm-up)."""
    run()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_peak_bytes(run) -> int:
    """Linux only, meant for a fresh process: after a warm-up call, reset the peak resident set
    to the current one, call ``run`` once and return how far the peak rose."""
    run()
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current VmRSS
        f.write("5")
    before = _status_kib("VmRSS")
    run()
    return (_status_kib("VmHWM") - before) * 1024


def report_worker_result(peak_bytes: int) -> None:
    print(json.dumps({"peak_bytes": peak_bytes}))


def run_worker(cmd: list) -> int | None:
    """Run a benchmark script as a fresh worker process and read the peak it reports (Linux only).
    Large blocks come straight from mmap there, so freed memory leaves the resident set at once."""
    if not sys.platform.startswith("linux"):
        return None
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_bytes"]


COPY_OF_PARAMETERS = "copy of every parameter"


def time_optimizer_steps(base, makers: dict, device, warmup: int, repeats: int):
    """``(seconds, state_bytes)`` per optimizer: each ``makers[name](params)`` gets its own copy
    of ``base``'s parameters holding ``base``'s gradients (fixed: only ``step()`` is timed, round
    robin, median); state bytes are read after the first step. The seconds also hold, under
    ``COPY_OF_PARAMETERS``, the memory-limit unit timed in the same round robin: one copy of
    every parameter (``copy_unit``), since a step is elementwise over the parameters."""
    from companion.memory import optimizer_state_bytes

    grads = [p.grad.clone() for p in base.parameters()]
    runs, state = {}, {}
    for name, make in makers.items():
        params = [torch.nn.Parameter(p.detach().clone()) for p in base.parameters()]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt = make(params)
        opt.step()
        state[name] = optimizer_state_bytes(opt)
        runs[name] = opt.step
    runs[COPY_OF_PARAMETERS] = copy_unit(list(base.parameters()))
    return round_robin_median(runs, device, warmup=warmup, repeats=repeats), state


def gpt_with_gradients(cfg, batch: int, seq: int, device):
    """A ``companion.lm.GPT(cfg)`` (seed 0) holding the gradients of one LM loss on random
    tokens ``[batch, seq]``: the fixed gradients the optimizer benchmarks step on."""
    from companion.lm import GPT

    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    idx = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    model(idx, idx)[1].backward()
    return model
