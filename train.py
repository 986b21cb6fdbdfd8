"""Train the base model: no text, class labels when the dataset has them. Flags: --help."""

import sys

from training.cli import train_base_main

if __name__ == "__main__":
    sys.exit(train_base_main())
