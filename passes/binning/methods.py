"""kmeans, adaptive, gmm, ternary, binary: binning passes that differ only in how they fit.

Each says how it fits a codebook per group (`graphpass.binning`) and which options it adds; the
engine (`engine.BinningPass`) does the rest.
"""

from __future__ import annotations

from graphpass import binning
from graphpass.manager import Option, register
from graphpass.passes.binning.engine import BITS_OPTION, BinningPass, entries


@register
class KMeansPass(BinningPass):
    name = "kmeans"
    summary = "k-means codebook per tensor, channel or group (near-exact 1-D k-means)"
    method_options = (
        BITS_OPTION,
        Option("k", int, 0, "codebook entries per group (overrides bits; 0: 2**bits)", low=0, high=65536),
    )

    supports_value_weight = True

    def fit_groups(self, values):
        return binning.kmeans(values, entries(self.config)), {}

    def fit_weighted(self, values, sample_weight):
        return binning.kmeans(values, entries(self.config), sample_weight=sample_weight), {}


@register
class AdaptivePass(BinningPass):
    name = "adaptive"
    summary = "codebook placed where the weights are dense (quantile-based) per tensor, channel or group"
    method_options = (BITS_OPTION,)

    def fit_groups(self, values):
        return binning.adaptive(values, 2 ** self.config["bits"]), {}


@register
class GMMPass(BinningPass):
    name = "gmm"
    summary = "Gaussian-mixture codebook whose overlapping components merge; reports those remaining"
    method_options = (
        Option("components", int, 16, "mixture components per group before merging", low=2, high=256),
        Option("merge_kl", float, 0.1, "merge components whose symmetric KL divergence is below this", low=0.0),
    )

    def codebook_entries(self):
        return self.config["components"]

    def fit_groups(self, values):
        found, remaining = binning.gmm(values, self.config["components"], merge_kl=self.config["merge_kl"])
        return found, {"components_remaining": int(remaining)}

    def _details(self, tensors):
        details = super()._details(tensors)
        details["components_remaining"] = max((t["components_remaining"] for t in tensors), default=None)
        return details


@register
class TernaryPass(BinningPass):
    name = "ternary"
    summary = "three values per group (-a, 0, +a), 1.6 bits per index"

    def codebook_entries(self):
        return 3

    def fit_groups(self, values):
        return binning.ternary(values), {}


@register
class BinaryPass(BinningPass):
    name = "binary"
    summary = "two values per group, 1 bit per index"

    def codebook_entries(self):
        return 2

    def fit_groups(self, values):
        return binning.binary(values), {}
