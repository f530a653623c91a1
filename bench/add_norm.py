"""Residual add + LayerNorm/RMSNorm: resnorm's fused kernel against its peers, in one run.

The benchmark itself lives in the package (``resnorm.bench``) so that ``resnorm bench``
runs it on any installed machine; this script is the same command:

    python bench/add_norm.py [--shapes 4096x768,16384x1024,8192x4096] [--repeats 7]
                             [--regimes fresh,reuse] [--no-compile] [--out f.json]
"""

import sys

from resnorm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
