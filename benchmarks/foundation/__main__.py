"""``python -m benchmarks.foundation``: gradient vs HBP pass vs CG-Newton step."""

from benchmarks.foundation import main

if __name__ == "__main__":
    main()
