"""Fidelity of generated images: FID, sFID, IS and precision/recall against a reference, with their protocol.

``images`` finds the image sets, ``inception`` runs the network, ``statistics`` reads and writes statistics
files (guided-diffusion's reference-batch layout), ``reference`` and ``cache`` give a reference's features,
``scores`` computes the metrics, ``protocol`` records how, ``make_reference`` and ``compare`` are commands.
"""

from .scores import FIDELITY_METRICS, fidelity_inputs, fidelity_metrics

__all__ = ["FIDELITY_METRICS", "fidelity_inputs", "fidelity_metrics"]
