"""Evaluation tools: they read what training wrote and measure it.

- :mod:`ulr.evaluate.robust`: accuracy under adversarial attacks and corruptions
  (``ulr robust``).
- :mod:`ulr.evaluate.plots`: figures from run directories (``ulr plot``).
- :mod:`ulr.evaluate.bench`: ULR against the other forward-only estimators and backprop
  (``ulr bench``).
- :mod:`ulr.evaluate.runs`: reading the run directories of ``ulr train`` (records, checkpoints,
  directories of runs), shared by the tools above.

Nothing in the estimator library imports this package.
"""
