"""Sample PNGs from a checkpoint (the original guide's command). Flags: --help."""

import sys

from training.cli import generate_main

if __name__ == "__main__":
    sys.exit(generate_main())
