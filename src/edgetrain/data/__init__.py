"""Offline datasets. Everything here loads from files that pip-installed packages ship:
nothing is downloaded at run time."""

from edgetrain.data.digits import load_mnist_source, load_uci_digits_target

__all__ = ["load_mnist_source", "load_uci_digits_target"]
