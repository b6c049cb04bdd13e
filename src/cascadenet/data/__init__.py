"""Datasets in their standard on-disk formats, read into memory (``datasets``) or streamed from image folders
(``streaming``), and batched by index with tensor ops (``loader``). Knows nothing of models or runs.
"""
