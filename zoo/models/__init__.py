"""The models: one generative story a file, each a Pyro program (a ``model`` and a ``guide``)
that registers itself (``@registry.register``); ``_mixture.py`` and ``nets.py`` hold what several
of them share. Nothing else lives here: the registry finds the models by walking this folder, so
a new model is one new file (and its test), and a helper module belongs in ``zoo/`` or in
``_name.py`` here (a module whose name starts with ``_`` is not a model).
"""
