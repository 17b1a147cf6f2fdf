"""pytest-benchmark cases: `pytest benchmarks/ --benchmark-only` (not collected by `python -m pytest`,
whose testpaths is tests/). They time a few small cases and assert nothing about wall-clock time."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
