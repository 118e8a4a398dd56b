#!/usr/bin/env python3
"""fsync vs fdatasync of a 4 KB write, appending vs overwriting in place (BENCHMARKS, session 5).

    python3 bench/sync-latency.py [DIR]      # DIR: where the test file goes (default: target/)
"""
import os
import sys
import time


def run(directory, name, sync, overwrite, n=400):
    path = os.path.join(directory, "_sync_latency_test")
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC)
    try:
        if overwrite:
            os.write(fd, b"\0" * 4096 * n)
            os.fsync(fd)
        xs = []
        for i in range(n):
            at = 4096 * i if overwrite else os.lseek(fd, 0, os.SEEK_END)
            os.pwrite(fd, os.urandom(4096), at)
            t = time.perf_counter()
            sync(fd)
            xs.append((time.perf_counter() - t) * 1000)
    finally:
        os.close(fd)
        os.unlink(path)
    xs.sort()
    print(f"{name:22s} p50 {xs[n // 2]:.3f} ms  p99 {xs[int(n * 0.99)]:.3f} ms")


directory = sys.argv[1] if len(sys.argv) > 1 else "target"
os.makedirs(directory, exist_ok=True)
for _ in range(2):
    run(directory, "fsync append", os.fsync, False)
    run(directory, "fdatasync append", os.fdatasync, False)
    run(directory, "fsync overwrite", os.fsync, True)
    run(directory, "fdatasync overwrite", os.fdatasync, True)
