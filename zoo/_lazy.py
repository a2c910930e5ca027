"""A module imported on its first use, so that ``zoo --help`` and argument errors answer
before torch, Pyro and matplotlib load (seconds on a busy machine)."""

import importlib


class Lazy:
    """``Lazy("zoo.fitting").fit_run``: the module is imported at the first attribute read."""

    def __init__(self, name: str):
        self._name, self._module = name, None

    def __getattr__(self, attr):
        if self._module is None:
            import matplotlib

            matplotlib.use("Agg")  # the CLI only writes files; set before pyplot is imported
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)
