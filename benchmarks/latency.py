"""Latency: TTFT and TPOT against the memory-bandwidth floor (see nanovllm/benchmark/latency.py).

python benchmarks/latency.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from nanovllm.benchmark.latency import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
