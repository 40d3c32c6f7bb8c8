"""``python -m benchmarks``: the benchmark suite (see :mod:`benchmarks.suite`)."""

from benchmarks.suite import main

if __name__ == "__main__":
    main()
