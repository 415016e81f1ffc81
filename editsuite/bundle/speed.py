"""What makes the PyTorch backend fast on a CPU, each piece measured by `bench/speed.py` (bench/RESULTS.md).

- `fast_dtype`: bfloat16 where the CPU computes it natively (AVX512-BF16 or AMX), float16 on GPUs,
  float32 elsewhere. bf16 has fp32's range, so nothing overflows on a CPU; fp16 can (see the VAE guard in
  torch_backend).
- attention: diffusers' own SDPA processor. A blocked attention written here (one head and block of queries
  at a time) was the default until issue 20: warm and interleaved it is slower than SDPA both idle and with
  a core shared, where its thousands of small parallel regions collapse (bench/pieces.py; the code now
  lives in bench/blocked_attention.py for that comparison).
- `pack_convolutions`: torch hands oneDNN a conv's weights in PyTorch's layout at every call, and oneDNN
  reorders them into its blocked layout each time (about 0.3 s of an SD 1.5 UNet step, seen with
  ONEDNN_VERBOSE=1). Laid out once at load, the same kernels run on them; the output is bit for bit the same.
- `keep_freed_memory`: glibc returns every large freed block to the kernel, so each UNet step pays about
  140 000 page faults (0.5 GB zeroed by the kernel) to get it back; keeping freed memory for reuse saves
  about 5 % of a step. The kept memory is handed back before the VAE runs (`release_freed_memory`), and
  tiled VAE work runs with glibc's plain behaviour (`plain_malloc`), so neither raises the peak.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys

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
    module for this: torch.utils.mkldnn's converted modules take and return oneDNN tensors, as TorchScript,
    so this one converts its input and output itself (two cheap activation copies against a weight reorder).
    The original weights are dropped with the original module, so memory does not grow."""

    def __init__(self, conv: torch.nn.Conv2d):
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        w = conv.weight.detach()
        self.packed = torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), self.padding, self.stride,
                                                                 self.dilation, self.groups)
        self.bias = None if conv.bias is None else conv.bias.detach().to_mkldnn()
        self.dtype = w.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.mkldnn_convolution(x.contiguous().to_mkldnn(), self.packed, self.bias, self.padding,
                                       self.stride, self.dilation, self.groups)
        return out.to_dense()


def pack_convolutions(module: torch.nn.Module) -> int:
    """Swap every zero-padded Conv2d inside `module` (CPU, inference, weights in bf16 or fp32) for a
    `PackedConv2d`. Returns how many were swapped. One at a time, each original freed (and handed back to
    the system when glibc keeps freed memory) before the next is packed: the peak stays that of the module
    (measured: 2.65 GiB for an SD 1.5 bundle in bf16 either way; holding the originals to the end, 3.87)."""
    where = [(parent, name) for parent in module.modules() for name, child in parent.named_children()
             if type(child) is torch.nn.Conv2d and child.padding_mode == "zeros"
             and not isinstance(child.padding, str) and child.weight.device.type == "cpu"]
    for parent, name in where:
        setattr(parent, name, PackedConv2d(getattr(parent, name)))
        release_freed_memory()
    return len(where)


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
