"""Where work runs: the one `resolve_device` every verb uses, and how many CPU threads torch gets.

A device the machine does not have is a one-line error that lists the devices it does have,
never torch's "Found no NVIDIA driver" traceback from deep inside the first `.to(device)`.

Thread counts: torch starts one intra-op thread per physical core whatever else runs there; on
a shared machine those threads wait on each other and a step gets 10-100x slower. `set_threads`
gives torch the cores that are free (the CPUs this process may use, less the load average),
unless ``OMP_NUM_THREADS`` or ``--threads`` says otherwise.
"""

from __future__ import annotations

import os

import torch

from alignpipe.util.errors import AlignpipeError

AUTO = (None, "", "auto")
# torch's own default before anyone changed it: one thread per physical core (or OMP_NUM_THREADS)
_TORCH_DEFAULT_THREADS = torch.get_num_threads()


class DeviceError(AlignpipeError):
    """A device or thread count this machine cannot give."""


def available_devices() -> list[str]:
    """The devices torch can use here, e.g. ``['cpu', 'cuda:0', 'cuda:1']``."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        found.append("mps")
    return found


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _no_cuda_reason() -> str:
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return "this torch build has no CUDA support"
    return "no NVIDIA driver or GPU is visible to this process"


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`device` as a torch device, checked against what this machine has.

    None, "" and "auto" pick the first GPU when there is one, else the CPU.
    """
    if device in AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    have = ", ".join(available_devices())
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"--device {device!r} is not a device name (use cpu, cuda, cuda:N "
                          f"or mps); this machine has: {have}") from None
    if resolved.type == "cpu":
        return resolved
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device}: {_no_cuda_reason()}; this machine has: "
                              f"{have}")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise DeviceError(f"--device {device}: this machine has {count} CUDA "
                              f"device{'s' if count != 1 else ''} ({have})")
        return resolved
    if resolved.type == "mps":
        if not _mps_available():
            raise DeviceError(f"--device {device}: Apple MPS is not available here; this "
                              f"machine has: {have}")
        return resolved
    raise DeviceError(f"--device {device}: alignpipe runs on cpu, cuda or mps; this machine "
                      f"has: {have}")


# ---- CPU threads --------------------------------------------------------------------------------
def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cpus, quota) if quota else cpus)


def _cgroup_quota() -> int | None:
    """cgroup v2 ``cpu.max`` (a container's CPU limit), rounded up; None when unlimited."""
    try:
        limit, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
    except (OSError, ValueError):
        return None
    if limit == "max":
        return None
    return max(1, -(-int(limit) // int(period)))


def free_cpus() -> int:
    """Usable CPUs less the share the 1-minute load average says others keep busy."""
    cpus = usable_cpus()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return cpus
    # The load average counts the whole machine; scale it to the CPUs this process may use.
    busy = load * cpus / max(cpus, os.cpu_count() or cpus)
    return max(1, min(cpus, int(cpus - busy + 0.5)))


def pick_threads(requested: int | None = None) -> tuple[int, str]:
    """(threads, why): `requested` if given, else OMP_NUM_THREADS if set, else the free CPUs
    (never more than torch's own default of one per physical core)."""
    if requested is not None:
        if requested < 1:
            raise DeviceError(f"--threads must be at least 1, got {requested}")
        return requested, "--threads"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env:
        try:
            return max(1, int(env)), "OMP_NUM_THREADS"
        except ValueError:
            raise DeviceError(f"OMP_NUM_THREADS={env!r} is not a number of threads") from None
    free = free_cpus()
    return max(1, min(free, _TORCH_DEFAULT_THREADS)), f"{free} of {usable_cpus()} CPUs free"


def set_threads(requested: int | None = None) -> int:
    """Give torch's intra-op pool the threads `pick_threads` chooses; returns the count."""
    threads, _ = pick_threads(requested)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
