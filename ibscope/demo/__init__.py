"""The bundled examples behind ``ibscope demo`` and the packaged run configs.

* :mod:`ibscope.demo.tasks` - the 12-bit task (4096 patterns, icosahedron dipole rule).
* :mod:`ibscope.demo.models` - ``ib_net`` (12-10-7-5-4-3-2, tanh/ReLU) and ``digits_mlp``.
* :mod:`ibscope.demo.train` - deterministic training with log-spaced canonical checkpoints.
* :mod:`ibscope.demo.digits` - scikit-learn's digits with held-out and transformed OOD sets.
* :mod:`ibscope.demo.run` - ``ibscope demo``: the tanh and ReLU runs and their side-by-side planes.

The pipeline that runs them is :mod:`ibscope.pipeline` (``ibscope run``).
"""
