"""The reproduction harness: validation-only hyperparameter search (and, later, baselines and result tables).

Uses only sadi_peft's public API; the library itself never imports it.
"""
