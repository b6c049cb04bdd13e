"""Training: the losses, the optimiser and schedule, the loop and its resumable run directory, torchrun, Ctrl-C and
SIGTERM, and precise batch norm of a finished run (``cascadenet recalibrate``).
"""
