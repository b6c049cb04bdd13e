"""Anytime models: the interface every model satisfies, the cascaded ResNets and their engines, the baselines of the
anytime literature (SDN, MSDNet), the registry that names them, and their files.

Imports only ``cascadenet.utils``. See docs/architecture.md for what each module owns.
"""
