"""glibc's allocator set for photo-sized buffers beside a model.

Called first by every entry point (the CLI's ``main``, the container's ``create_app``) and again
by :func:`platemask.pipeline.run_job` (for callers such as the Airflow workers): the arena limit
only binds threads that have not allocated yet, so the earlier the better. Nothing else here: no
torch, no numpy, so calling it costs nothing before the heavy imports.
"""
from __future__ import annotations

import ctypes

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
