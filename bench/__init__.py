"""TrialSync benchmarks (bench/README.md).

The benchmarks measure TrialSync, not the embedded broker's storage engine: their stacks keep the
broker in memory (as every earlier result did) unless TRIALSYNC_BROKER_STORAGE says otherwise;
bench/broker_bench.py compares the engines.
"""

import os as _os

_os.environ.setdefault("TRIALSYNC_BROKER_STORAGE", "memory")
