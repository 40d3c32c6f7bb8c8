"""``python -m benchmarks.cg_step``: the seed model's CG-Newton step beside SGD."""

from benchmarks.cg_step import main

if __name__ == "__main__":
    main()
