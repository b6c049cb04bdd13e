"""The paper's three properties, measured on trained runs: typical examples are classified sooner (``typicality``),
robustness to persistent and transient noise (``noise``), and the output trace for stopping policies
(``stopping``) and out-of-distribution detection (``ood``). Each reads runs; none trains the run it analyses.
"""
