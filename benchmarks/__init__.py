"""Reproducible speed, memory and accuracy comparisons of peftkit against a plain Trainer + peft baseline.

Run ``python -m benchmarks.run --help``; results and their method are described in benchmarks/README.md.
"""
