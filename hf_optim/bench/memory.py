"""``hf-optim bench --memory``: the exact state bytes and the measured peak memory of one optimizer step per case.

What a step costs beyond the parameters and gradients is the state it creates plus its temporaries (work copies,
expanded stored state, kernel scratch). On CUDA it is measured in-process with the caching allocator's peak
(``torch.cuda.max_memory_allocated``, reset after the parameters exist). On the CPU there is no allocator counter, so
each case runs in a fresh process that materialises the parameters and gradients, resets the kernel's peak-RSS counter
(Linux ``/proc/self/clear_refs``), runs the first step and reads the peak against the resident set before it: the
step's peak (page-granular; the allocator may keep freed memory, so an upper bound of the live peak). One step of the
same case on the ``tiny`` set runs first, so that loading code and libraries is not counted.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from typing import Any

import torch

from .cases import BenchCase, all_cases
from .params import SIZES, make_params
from .timing import state_bytes


def _case(name: str) -> BenchCase:
    return next(case for case in all_cases() if case.name == name)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    return next((int(line.split()[1]) for line in lines if line.startswith(field + ":")), None)


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (Linux: ``5 > /proc/self/clear_refs``); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


def _cpu_peak_of(run: Any) -> int:
    """Bytes by which the resident set grew at its peak while ``run()`` ran: VmHWM after a reset against VmRSS
    before; without the reset, ``ru_maxrss`` before and after (then a peak reached earlier hides the step's)."""
    if _reset_peak():
        before = _status_kib("VmRSS")
        run()
        return (_status_kib("VmHWM") - before) * 1024
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024  # Linux reports KiB


def _one_step(case: BenchCase, size: str, device: str, dtype: torch.dtype) -> dict[str, Any]:
    warm = make_params("tiny", device, dtype)  # load the step's code paths and libraries before measuring
    case.build(warm).step()
    del warm
    params = make_params(size, device, dtype)
    numel = sum(p.numel() for p in params)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.max_memory_allocated(device)
        opt = case.build(params)
        opt.step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        built: list[torch.optim.Optimizer] = []
        peak = _cpu_peak_of(lambda: built.append(case.build(params)) or built[0].step())
        opt = built[0]
    return {"name": case.name, "numel": numel, "state_bytes": state_bytes(opt), "peak_step_bytes": peak}


def measure(cases: list[BenchCase], size: str, device: str, dtype: str) -> list[dict[str, Any]]:
    """One row per case (see the module docstring); CPU cases each in their own process."""
    rows = []
    for case in cases:
        if torch.device(device).type == "cuda":
            row = _one_step(case, size, device, getattr(torch, dtype))
        else:
            child = [sys.executable, "-m", "hf_optim.bench.memory", case.name, size, dtype]
            done = subprocess.run(child, capture_output=True, text=True, timeout=1800)
            if done.returncode != 0:
                row = {"name": case.name, "error": done.stderr.strip().splitlines()[-1:] or ["failed"]}
            else:
                row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def format_row(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"{row['name']:<44s} ERROR {row['error'][0]}"
    n = row["numel"]
    return (
        f"{row['name']:<44s} state {row['state_bytes'] / n:6.3f} B/param ({row['state_bytes'] / 2**20:8.1f} MiB)   "
        f"peak of one step {row['peak_step_bytes'] / n:6.3f} B/param ({row['peak_step_bytes'] / 2**20:8.1f} MiB)"
    )


def header(size: str, device: str) -> str:
    return f"# {size}: {SIZES[size].numel():,} params on {device}; state = exact bytes, peak = measured (see --help)"


if __name__ == "__main__":
    name, size_arg, dtype_arg = sys.argv[1:4]
    torch.set_num_threads(1)
    print(json.dumps(_one_step(_case(name), size_arg, "cpu", getattr(torch, dtype_arg))))
