"""The data sets the zoo knows by name: a module of names alone, so that the command line can
offer them (``zoo data fetch NAME``, ``zoo --help``) without importing torch (``zoo.data``
loads them)."""

NAMES = ("mnist", "digits", "faithful", "gmm-synthetic", "bmm-synthetic")
