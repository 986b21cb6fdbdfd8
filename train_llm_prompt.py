"""Train the text-conditioned model (the original guide's command). Flags: --help."""

import sys

from training.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
