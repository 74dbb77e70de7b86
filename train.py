"""The trainer's command line, as the design has it: `python train.py ...` or `torchrun ... train.py ...`
from a checkout. The trainer lives in the package (sslkit/train.py; installed: `sslkit-train`,
`python -m sslkit.train`); see `python train.py --help`."""

import sys

import sslkit.train

if __name__ == "__main__":
    sys.exit(sslkit.train.main())
# `import train` (scripts and tests written before the move) gets the package's module itself, so
# what they read or patch is what the trainer runs.
sys.modules[__name__] = sslkit.train
