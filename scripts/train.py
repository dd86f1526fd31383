"""Entry point for `accelerate launch [--config_file recipes/accelerate/X.yaml] scripts/train.py RECIPE [--key value ...]`."""

import sys

from hfgen.train import cli

if __name__ == "__main__":
    sys.exit(cli())
