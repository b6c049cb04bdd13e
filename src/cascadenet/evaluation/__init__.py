"""Anytime evaluation: the metrics of a logit trajectory, stopping policies, a run's eval.json, real early exit and
the figures. Imports models, data and runs; never the training loop.
"""
