"""``python -m benchmarks.ekfac``: run the section (results in benchmarks/results/)."""

from benchmarks.ekfac.run import main

main()
