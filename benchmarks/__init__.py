"""forethought against its peers, in one run: `python -m benchmarks` (see benchmarks/RESULTS.md).

Every engine runs in its own subprocess (`python -m benchmarks.worker`) so that its peak RSS and
thread pools are its own; the parent only collects results, prints the table and writes the files.
"""
