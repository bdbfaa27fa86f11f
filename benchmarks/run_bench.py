"""Benchmark script: the same as `ragsae bench`, runnable from a checkout.

python benchmarks/run_bench.py ../shared/datasets/msmarco-5k
python benchmarks/run_bench.py ../shared/datasets/cranfield --sweep layer=4,8 pooling=max,sum
"""

import sys

from ragsae.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
