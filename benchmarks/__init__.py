"""The measurements behind bench.py (see its docstring) and BENCHMARKS.md."""
