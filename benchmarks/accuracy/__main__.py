"""``python -m benchmarks.accuracy [--suite quick]``: one accuracy suite on its own.

Prints the Markdown section; ``--out DIR`` also writes ``accuracy.json`` and the plot.
"""

import sys

from benchmarks.accuracy import main

if __name__ == "__main__":
    main(sys.argv[1:])
