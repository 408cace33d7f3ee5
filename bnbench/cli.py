"""The `bnbench` command line (the harness itself is built by a later issue)."""

import sys


def main(argv=None):
    print("bnbench: the benchmark harness is not built yet; nothing was measured.", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
