"""``python -m benchmarks.laplace``: see :mod:`benchmarks.laplace`."""

from benchmarks.laplace import main

if __name__ == "__main__":
    main()
