"""Reference models and data sets for studies, examples and benchmarks.

Each module imports its framework or data library itself; importing
``specops.zoo`` imports nothing heavy.
"""
