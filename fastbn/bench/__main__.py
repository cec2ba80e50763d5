"""``python -m fastbn.bench``: the comparison report (see ``--help``)."""
from ._report import main

if __name__ == "__main__":
    main()
