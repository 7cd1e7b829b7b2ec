"""Benchmarks: figures for the README, printed as `key=value` lines.

    python bench.py lte      # forward-model spectra per second (issue 2)
    python bench.py fit      # wall time and nfev per fit on the IRAS 16293-2422 B windows (issue 3)
    python bench.py cube     # cube fitting throughput (issue 4)
"""

import argparse

BENCHES = {}


def main() -> None:
    fmt = argparse.RawTextHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("which", choices=sorted(BENCHES), help="which benchmark to run")
    args = parser.parse_args()
    BENCHES[args.which]()


if __name__ == "__main__":
    main()
