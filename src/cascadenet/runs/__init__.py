"""Reading a run directory: its stored options (``config``), the lock of the process training it (``lock``), its data
split and normalisation (``data``), and its model with that data (``load``).

Evaluation, the property analyses and training all read runs through this layer; it imports nothing of them.
"""
