"""Matplotlib for the commands that write figures: the file backend, imported only when one is drawn."""
from __future__ import annotations


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no screen: figures go to files
    import matplotlib.pyplot as plt

    return plt
