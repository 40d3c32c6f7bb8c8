"""``python -m benchmarks.language_models``: see :mod:`benchmarks.language_models`."""

from benchmarks.language_models import main

if __name__ == "__main__":
    main()
