"""Small helpers shared across the package."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from potstill.errors import USER_ERRORS, OutOfDisk


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --- disk

NEARLY_FULL = 64 * 2**20  # free bytes under which a failed write is taken as a full disk


def human_bytes(n: float) -> str:
    """``1.25 GiB`` from a tenth of a GiB up, ``12.5 MiB`` from one MiB, else ``250.0 KiB``."""
    if n >= 2**30 / 10:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def folder_bytes(path: Path) -> int:
    """The bytes of every file under ``path`` (0 where it is no folder)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def free_bytes(path: Path) -> int:
    """Free bytes on the disk of ``path``, or of its nearest existing parent."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def require_free(where: Path, need: float, says: Callable[[int], str]) -> None:
    """Refuse, with :class:`~potstill.errors.OutOfDisk` and ``says(free bytes)``, a write of
    ``need`` more bytes under ``where`` that its disk has no room for."""
    free = free_bytes(where)
    if free < need:
        raise OutOfDisk(says(free))


@contextlib.contextmanager
def when_disk_fills(
    where: Path, cleanup: Callable[[], object], says: Callable[[], str]
) -> Iterator[None]:
    """Around a write under ``where``: when the disk runs out (:func:`out_of_disk`), ``cleanup()``
    the partial write, then raise :class:`~potstill.errors.OutOfDisk` with ``says()`` (called
    after the cleanup, so it can name what is left and what is free)."""
    try:
        yield
    except USER_ERRORS:  # potstill's own, already saying what to do
        raise
    except Exception as e:
        if not out_of_disk(e, free_bytes(where)):
            raise
        cleanup()
        raise OutOfDisk(says()) from e


def out_of_disk(error: BaseException, free: int) -> bool:
    """Whether a write that raised ``error`` ran out of disk (``free`` bytes left at that
    moment): an OSError with ENOSPC, safetensors' error that names it, or — torch.save says only
    "unexpected pos …" — a disk left with less than :data:`NEARLY_FULL`."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    return "No space left" in str(error) or free < NEARLY_FULL


def autocast_dtype(precision: str, device_type: str | None = None) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` (None: plain fp32). ``auto`` is bf16 where bf16
    matmuls beat fp32 on ``device_type`` (default: CUDA when available, else the CPU)."""
    if precision == "auto":
        device_type = device_type or default_device_type()
        return torch.bfloat16 if bf16_is_faster(device_type) else None
    return torch.bfloat16 if precision == "bf16" else None


def default_device_type() -> str:
    """Where a run lands without a launcher's say: CUDA when available, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.cache
def bf16_is_faster(device_type: str) -> bool:
    """Whether bf16 matmuls run faster than fp32 on this machine's ``device_type``.

    On CUDA it is a question of support. On a CPU it depends on the chip and is measured once per
    process (~0.1 s): with bf16 matrix units (AMX, or avx512_bf16) bf16 ran ~4x faster than fp32 on
    a 2-core reference machine; on an AVX2-only EPYC the same matmul in bf16 is emulated and ran
    ~6x slower (16 against 93 GFLOP/s, measured).
    """
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    g = torch.Generator().manual_seed(0)  # not the global RNG: seeded runs stay as they were
    a, b = torch.randn(128, 576, generator=g), torch.randn(576, 1536, generator=g)  # a projection

    def best(x: torch.Tensor, y: torch.Tensor) -> float:
        x @ y  # warm-up: kernel selection, weight packing
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - t0)
        return min(times)

    return 1.25 * best(a.bfloat16(), b.bfloat16()) < best(a, b)


def precision_note(precision: str, device_type: str | None = None) -> str:
    """One line saying what ``train.precision`` runs as on this device (as autocast_dtype)."""
    device_type = device_type or default_device_type()
    dtype = autocast_dtype(precision, device_type)
    runs = "bf16 autocast (fp32 master weights)" if dtype is not None else "fp32"
    if precision != "auto":
        return f"precision: {runs}"
    why = "faster" if dtype is not None else "slower"
    return f"precision auto: {runs}; bf16 matmuls are {why} than fp32 on this {device_type}"


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel
    (``M_MMAP_MAX=0``: big blocks come from the heap, not fresh ``mmap`` calls;
    ``M_TRIM_THRESHOLD`` 2 GiB: the heap is not shrunk after every step). A CPU training step
    frees and re-allocates hundreds of MB (logit chunks, the head's gradient, activations); with
    the defaults every block over 32 MB is a fresh mapping whose pages fault in one by one (260 MB:
    90 ms fresh, 15 ms reused). What CUDA's caching allocator does for GPU memory. Process-wide
    and one-way; a no-op (False) off glibc. Token-level KD on the demo pair, 2-core CPU, fp32,
    12 steps: 1.88M -> 0.54M page faults, system time 8.2 -> 4.2 s, 217 -> 233 tokens/s (mean of
    three alternating runs each), peak RSS +4%."""
    libc = _glibc()
    if libc is None:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def return_freed_memory(threshold: int = 2**20) -> bool:
    """Make glibc's malloc serve blocks of ``threshold`` bytes or more from fresh mappings that
    go back to the kernel when freed, at a fixed threshold (glibc otherwise raises it after each
    freed mapping, up to 32 MB, and serves the multi-MB blocks from a heap that fragments and
    keeps them). For FSDP2 on a CPU, whose every forward gathers and frees each unit's weights:
    the demo pair under 2-process FSDP2 peaked at 3.2 GiB per process with glibc's defaults and
    1.99 GiB with this. Process-wide; a no-op (False) off glibc."""
    libc = _glibc()
    m_mmap_threshold = -3  # <malloc.h>
    return libc is not None and bool(libc.mallopt(m_mmap_threshold, threshold))


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") else None  # not musl


def pad_token_id(tokenizer: Any) -> int:
    """The id that pads batches: the tokenizer's pad token, else its EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def peak_memory_bytes(device_type: str) -> int | None:
    """This process's peak memory so far: on a GPU the most the caching allocator held
    (``torch.cuda.max_memory_reserved``), on a CPU the peak resident set (VmHWM, Linux; None
    elsewhere)."""
    if device_type == "cuda":
        return torch.cuda.max_memory_reserved()
    return process_status_bytes("VmHWM")


def process_status_bytes(field: str) -> int | None:
    """A memory field of this process's /proc/self/status (``VmRSS``, ``VmHWM``, …) in bytes;
    None off Linux."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024  # kB
    return None
