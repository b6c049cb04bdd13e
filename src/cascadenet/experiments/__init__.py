"""Whole experiments in one call: the demo (``make demo``) and the paper's comparison (``cascadenet reproduce``).
They train and evaluate through the layers below.
"""
