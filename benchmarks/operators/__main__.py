"""``python -m benchmarks.operators``: run the section (results in benchmarks/results/)."""

from benchmarks.operators.run import main

main()
