"""The likelihood-ratio estimator, :class:`LikelihoodRatio`, built from small parts (the math
itself lives in :mod:`ulr.functional`):

* :mod:`.likelihood_ratio` — the class: configuration, state, hooks for variants;
* :mod:`.step` — one ``loss_and_grads`` call: clean pass, the plan's passes, ``.grad``;
* :mod:`.memory` — the memory modes ``store`` / ``chunked`` / ``replay``: one pass each;
* :mod:`.forward` — one forward with noise at the sites (the pass handler);
* :mod:`.records` — what a site leaves for the gradient, and its assembly;
* :mod:`.noise_stream` — the generator, the sampler and their snapshots;
* :mod:`.site_table` — which modules and marks are sites, with which noise;
* :mod:`.probe` — which parameters each site depends on (the first clean pass);
* :mod:`.batchnorm` — train-mode BatchNorm under noise;
* :mod:`.trees` — walking nested inputs and outputs.
"""

from .likelihood_ratio import LikelihoodRatio, Memory
from .site_table import DEFAULT_SIGMA, NoiseArg
from .trees import replicate

__all__ = ["LikelihoodRatio", "replicate", "DEFAULT_SIGMA", "Memory", "NoiseArg"]
