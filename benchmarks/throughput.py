"""Offline throughput, nanovllm vs Hugging Face transformers (see nanovllm/benchmark/throughput.py).

python benchmarks/throughput.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from nanovllm.benchmark.throughput import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
