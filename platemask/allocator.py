"""A process's memory set-up, done by its entry point before the heavy imports.

* glibc's allocator set for photo-sized buffers beside a model (:func:`return_freed_memory_to_os`):
  called first by every entry point (the CLI's ``main``, the container's ``create_app``) and again
  by :func:`platemask.pipeline.run_job` (for callers such as the Airflow workers): the arena limit
  only binds threads that have not allocated yet, so the earlier the better.
* Triton kept out (:func:`keep_triton_out`): called by the same entry points and by the Airflow
  workers' detector before torch is first imported.

Nothing else here: no torch, no numpy, so calling it costs nothing before the heavy imports.
"""
from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8


def return_freed_memory_to_os(mmap_threshold: int = 4 << 20, trim_threshold: int = 32 << 20,
                              arenas: int = 1) -> bool:
    """Set glibc's allocator for photo-sized buffers beside a model; idempotent.

    * ``mmap_threshold``: blocks of this size or more are mapped apart and unmapped when freed.
      Left to itself glibc raises the threshold after each large free, up to 32 MB; from then on
      Pillow's 16 MB image blocks and numpy's strips came from per-thread heaps, which keep freed
      memory: with a dozen reader and writer threads that was GBs (12 x 79 MP photos: 4.9 GB peak
      RSS). It must not be too low either: the detector allocates and frees tensors of 1-4 MB many
      times a batch, and at 1 MB (the setting until 2026-11-26) each one was mapped, faulted in
      page by page and unmapped again: the CLI's kernel time on 40 photos of 1280 x 720 went from
      3.4 to 2.0 s (``bench/bench_mask.py``).
    * ``trim_threshold``: a heap keeps this much free memory at its top, so the next batch reuses
      the last batch's pages instead of faulting new ones in.
    * ``arenas``: no new heap per thread once this many exist. Photos and tensors under
      ``mmap_threshold`` now live in heaps, and a heap per reader and writer thread, each keeping up
      to ``trim_threshold``, raised the CLI's peak RSS from 1.36 GB (1 MB threshold) to 1.55 GB;
      with this limit 1.47 GB (and 1.37-1.39 GB once ONNX Runtime's memory pattern was off).
      Threads that allocated before the call keep the heap they have, hence the early calls.

    False where there is no glibc ``mallopt``, or where it refused a setting.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    done = [mallopt(param, int(value)) for param, value in
            ((M_ARENA_MAX, arenas), (M_TRIM_THRESHOLD, trim_threshold), (M_MMAP_THRESHOLD, mmap_threshold))]
    return all(done)


def keep_triton_out() -> bool:
    """Keep torch from importing Triton in this process; idempotent. True when Triton is kept out.

    torchvision's import pulls in ``torch._dynamo``, which imports Triton (a GPU kernel compiler the
    CUDA wheels install) only to learn whether it is installed; torch then maps Triton's compiler and
    the CUDA libraries it loads: 75-90 MB resident on a CPU (``import torchvision`` 672 MB with it,
    595 MB without, 2026-11-28). platemask never compiles a model (no ``torch.compile``, no Inductor):
    inference and training run torch's own kernels, on a CPU and on a GPU (where torch then keeps its
    native kernels for the few operators it would otherwise route to Triton). Marked absent in
    ``sys.modules``, ``import triton`` fails and torch answers "no Triton" everywhere.

    Only before torch is imported (afterwards torch has already decided, and what it loaded stays),
    and never over a Triton already imported.
    """
    if "triton" in sys.modules:
        return sys.modules["triton"] is None
    if "torch" in sys.modules:
        return False
    sys.modules["triton"] = None
    return True
