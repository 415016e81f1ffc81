"""What makes the PyTorch backend fast on a CPU, each piece measured by `bench/pieces.py` (bench/RESULTS.md).

- `fast_dtype`: bfloat16 where the CPU computes it natively (AVX512-BF16 or AMX), float16 on GPUs,
  float32 elsewhere. bf16 has fp32's range, so nothing overflows on a CPU; fp16 can (see the VAE guard in
  torch_backend).
- attention: diffusers' own SDPA processor. A blocked attention written here (one head and block of queries
  at a time) was the default until issue 20: warm and interleaved it is slower than SDPA both idle and with
  a core shared, where its thousands of small parallel regions collapse (bench/pieces.py; the code now
  lives in bench/blocked_attention.py for that comparison).
- `pack_convolutions`, `pack_linears` and channels-last: torch hands oneDNN a conv's weights in PyTorch's
  layout at every call, and oneDNN reorders them into its blocked layout each time (about 0.3 s of an SD 1.5
  UNet step, seen with ONEDNN_VERBOSE=1); an NCHW activation is reordered too, in and out of every conv.
  Laid out once at load, and fed NHWC samples (the backend hands the UNet a channels-last sample), the same
  oneDNN kernels run with neither reorder; the result moves by at most one bf16 rounding (oneDNN adds the
  bias before rounding). bf16 Linear weights laid out once give bit-identical results. Measured with
  bench/pieces.py and the 3-round bench/speed.py (bench/RESULTS.md): a UNet step 1.29x diffusers bf16 idle.
  The VAE runs channels-last (1.64x idle, 1.85x with a core busy) with its weights as they are (its
  activations dominate). Compiling the UNet (torch.compile, AOTInductor) was measured and gains nothing over
  this (bench/aoti_probe.py).
- `ThreadGovernor`: torch runs one thread per core, and when another process keeps a core busy its threads
  wait on each other at every parallel region; one thread is then faster (bench/pieces.py: a UNet step 1.22x
  diffusers' with one core busy, against 1.00x for two threads). Before each UNet and VAE call the governor
  measures how much CPU other processes took since the last call and runs as many threads as cores are free.
- `keep_freed_memory`: glibc returns every large freed block to the kernel, so each UNet step pays about
  140 000 page faults (0.5 GB zeroed by the kernel) to get it back; keeping freed memory for reuse gives a
  UNet step 1.07x and a 512 px VAE decode, whose blocks are larger, 1.49x (bench/pieces.py, idle). The kept
  memory is handed back before the VAE runs (`release_freed_memory`), and tiled VAE work runs with glibc's
  plain behaviour (`plain_malloc`), so neither raises the peak.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import time

import torch


def cpu_has_bf16() -> bool:
    """True where the CPU has native bf16 matmuls (AVX512-BF16 or AMX), as oneDNN reports it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def fast_dtype(device: torch.device) -> torch.dtype:
    """`--dtype auto`: bf16 on CPUs that have it, fp16 on GPUs, fp32 otherwise."""
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    return torch.float16


class PackedConv2d(torch.nn.Module):
    """A zero-padded Conv2d whose weights oneDNN laid out once, for inference on a CPU. torch has no eager
    module for this (torch.utils.mkldnn's converted modules take and return oneDNN tensors, as TorchScript);
    this one calls the oneDNN op inductor's frozen graphs call, on ordinary tensors: a channels-last input is
    taken as it is and the output stays channels-last, so no activation is copied between layouts. The
    original weights are dropped with the original module, so memory does not grow."""

    def __init__(self, conv: torch.nn.Conv2d):
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = conv.kernel_size
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        w = conv.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_convolution_weight(w, self.padding, self.stride, self.dilation,
                                                                  self.groups)
        self.bias = None if conv.bias is None else conv.bias.detach()
        self.dtype = w.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._convolution_pointwise(x, self.packed, self.bias, self.padding, self.stride,
                                                       self.dilation, self.groups, "none", [], "")


class PackedLinear(torch.nn.Module):
    """A bf16 Linear whose weights oneDNN laid out once (what inductor's freezing does; torch has no eager
    module for it). The output is bit for bit nn.Linear's (tests/test_speed.py)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_convolutions(module: torch.nn.Module) -> int:
    """Swap every zero-padded Conv2d inside `module` (CPU, inference, weights in bf16 or fp32) for a
    `PackedConv2d`. Returns how many were swapped. One at a time, each original freed (and handed back to
    the system when glibc keeps freed memory) before the next is packed: the peak stays that of the module
    (measured: 2.65 GiB for an SD 1.5 bundle in bf16 either way; holding the originals to the end, 3.87)."""
    return _swap(module, PackedConv2d, lambda c: type(c) is torch.nn.Conv2d and c.padding_mode == "zeros"
                 and not isinstance(c.padding, str))


def pack_linears(module: torch.nn.Module) -> int:
    """Swap every bf16 Linear inside `module` (CPU, inference) for a `PackedLinear`; returns how many."""
    return _swap(module, PackedLinear, lambda c: type(c) is torch.nn.Linear and c.weight.dtype == torch.bfloat16)


def _swap(module: torch.nn.Module, packed, wanted) -> int:
    where = [(parent, name) for parent in module.modules() for name, child in parent.named_children()
             if wanted(child) and child.weight.device.type == "cpu"]
    for parent, name in where:
        setattr(parent, name, packed(getattr(parent, name)))
        release_freed_memory()
    return len(where)


_START_THREADS = torch.get_num_threads()  # torch's own choice (or the user's), before any governor changed it


class ThreadGovernor:
    """Sets torch's thread count before each call from the cores other processes left free since the last
    one: /proc/stat's busy time of every process minus this process's own, over the wall time. Never more
    threads than torch had at the start (the user's setting or one per core), never fewer than one. Linux
    only (/proc/stat); elsewhere it leaves torch's threads alone. bf16 results depend on the thread count
    in their last bits, so a run under load can differ from an idle one by a level on some pixels;
    OMP_NUM_THREADS pins the count (no governor: `unless_pinned`)."""

    @classmethod
    def unless_pinned(cls) -> "ThreadGovernor | None":
        """A governor, or None where the user pinned the thread count (OMP_NUM_THREADS) or /proc/stat is
        not there."""
        if os.environ.get("OMP_NUM_THREADS") or cls._sample() is None:
            return None
        return cls()

    def __init__(self):
        self.most = _START_THREADS
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.last = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        own = os.times()
        # user nice system idle iowait irq softirq steal: busy = all but idle and iowait
        return time.monotonic(), sum(fields) - fields[3] - fields[4], own.user + own.system

    def threads(self) -> int:
        """The thread count for the next call (and sets it)."""
        now = self._sample()
        if now is None or self.last is None or now[0] - self.last[0] < 0.05:
            return torch.get_num_threads()
        wall = now[0] - self.last[0]
        others = max(0.0, (now[1] - self.last[1]) / self.tick - (now[2] - self.last[2])) / wall
        self.last = now
        n = max(1, min(self.most, int(self.cores - others + 0.5)))
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
        return n


_libc = None  # set once keep_freed_memory has tuned glibc


def keep_freed_memory() -> None:
    """Ask glibc to serve every block from its heap and keep freed memory there for reuse, instead of
    mapping and unmapping each large block (Linux with glibc only; a no-op elsewhere). Process-wide, so done
    once, by the PyTorch backend on a CPU. `release_freed_memory` hands the kept memory back."""
    global _libc
    if _libc is not None or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        if _set_malloc(libc, KEEP):
            _libc = libc
    except (OSError, AttributeError):  # musl or another libc
        return


# glibc mallopt settings (from malloc.h: M_TRIM_THRESHOLD -1, M_MMAP_THRESHOLD -3, M_MMAP_MAX -4).
KEEP = {-4: 0, -1: 1 << 31, -3: 1 << 30}  # every block from the heap, up to 2 GiB of freed memory kept
PLAIN = {-4: 65536, -1: 128 << 10, -3: 128 << 10}  # glibc's defaults (without their dynamic threshold)


def _set_malloc(libc, settings: dict) -> bool:
    return all(libc.mallopt(k, v) for k, v in settings.items())


@contextlib.contextmanager
def plain_malloc():
    """glibc's own behaviour for a while: for tiled VAE work over large pictures, whose many tiles would
    otherwise leave a kept heap of odd-sized holes (measured: 4.6 GiB for a 2048x2048 decode and encode
    with an SD 1.5 model loaded)."""
    if _libc is None:
        yield
        return
    _libc.malloc_trim(0)
    _set_malloc(_libc, PLAIN)
    try:
        yield
    finally:
        _libc.malloc_trim(0)
        _set_malloc(_libc, KEEP)


def release_freed_memory() -> None:
    """Return the freed memory glibc kept (malloc_trim) before work with other sizes, the VAE's large
    activations after the UNet's steps: kept blocks of the wrong sizes would only add to the peak
    (measured 3.6 instead of 3.2 GiB for a 512x512 txt2img)."""
    if _libc is not None:
        _libc.malloc_trim(0)
