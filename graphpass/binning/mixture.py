"""Gaussian mixture weight sharing: EM on a fine histogram, then merging of close components."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphpass.binning.candidate_cuts import _bin_positions
from graphpass.binning.kmeans1d import kmeans
from graphpass.binning.lloyd import _run_sums
from graphpass.binning.result import Binning, _as_groups, _label_dtype, _pad_row
from graphpass.binning.sorted_groups import (
    _TINY, _SortedGroups, _distinct_counts, _prefix_sum, _row_column, _sort_groups,
)


_GMM_BINS = 256  # histogram bins per group the EM runs on
_GMM_TOL = 1e-6  # relative log-likelihood change that counts as converged


@dataclass
class _Histogram:
    """Weighted histogram per group: weight, mean and variance of each bin."""

    weight: np.ndarray  # [G, B]
    mean: np.ndarray  # [G, B], centred like _SortedGroups.values
    var: np.ndarray  # [G, B]


def gmm(x: np.ndarray, components: int, *, merge_kl: float = 0.1, max_iter: int = 100) -> tuple[Binning, int]:
    """1-D Gaussian mixture weight sharing, per group.

    EM runs on a fine weighted histogram (bin weight, mean and variance, so
    the spread inside a bin is not lost), starting from :func:`kmeans`.
    Then the closest pair of components is merged (moment matching) while
    its symmetric KL divergence is below ``merge_kl``; every weight snaps to
    the mean of its most probable surviving component.  Returns the binning
    and the largest number of surviving components over the groups (the
    codebook width).
    """
    data = _as_groups(x)
    _label_dtype(components)
    sg = _sort_groups(data)
    hist = _histogram(sg, min(sg.n, _GMM_BINS, max(32, 16 * components)))
    start = kmeans(data, components).codebook - sg.center[:, None]
    pi, mu, var = _gmm_init(hist, start)
    pi, mu, var = _gmm_em(hist, pi, mu, var, max_iter, _variance_floor(sg))
    alive = _merge_components(pi, mu, var, merge_kl)
    return _gmm_binning(data, sg.center, pi, mu, var, alive)


def _histogram(sg: _SortedGroups, bins: int) -> _Histogram:
    positions = _bin_positions(sg, bins, _distinct_counts(sg.raw))
    weight, total = _run_sums(sg, positions)
    squares = _prefix_sum(sg.values * sg.values)[_row_column(None, positions)]
    mean = np.divide(total, weight, out=sg.value_at(positions[:, :-1]), where=weight > 0)
    second = np.divide(np.diff(squares, axis=1), weight, out=mean * mean, where=weight > 0)
    return _Histogram(weight, mean, np.maximum(second - mean * mean, 0.0))


def _variance_floor(sg: _SortedGroups) -> np.ndarray:
    """Smallest component variance: keeps a component sitting on a single
    repeated value from collapsing to a zero-width spike."""
    spread = sg.values[:, -1] - sg.values[:, 0]
    return np.maximum((1e-4 * spread) ** 2, _TINY)[:, None]


def _gmm_init(hist: _Histogram, means: np.ndarray):
    """Weights and variances of the histogram bins nearest to each mean."""
    groups, components = means.shape
    labels = np.stack([np.searchsorted(0.5 * (m[1:] + m[:-1]), v) for m, v in zip(means, hist.mean)])
    flat = (np.arange(groups)[:, None] * components + labels).ravel()
    size = groups * components
    weight = np.bincount(flat, hist.weight.ravel(), size).reshape(groups, components)
    spread = (hist.mean - np.take_along_axis(means, labels, axis=1)) ** 2 + hist.var
    var = np.bincount(flat, (hist.weight * spread).ravel(), size).reshape(groups, components)
    var = np.divide(var, weight, out=np.zeros_like(var), where=weight > 0)
    return weight / weight.sum(axis=1, keepdims=True), means, var


def _gmm_em(hist: _Histogram, pi, mu, var, max_iter: int, floor: np.ndarray):
    """EM with responsibilities constant within a histogram bin.  Only groups
    whose log-likelihood still moves are updated, which is faster and makes
    batched and one-by-one runs agree."""
    pi, mu, var = pi.copy(), mu.copy(), np.maximum(var, floor)
    previous = np.full(pi.shape[0], -np.inf)
    active = np.arange(pi.shape[0])
    for _ in range(max_iter):
        if active.size == 0:
            break
        step = _em_step(hist, active, pi[active], mu[active], var[active], floor[active])
        loglik, pi[active], mu[active], var[active] = step
        moving = np.abs(loglik - previous[active]) > _GMM_TOL * np.abs(loglik)
        previous[active] = loglik
        active = active[moving]
    return pi, mu, var


def _em_step(hist: _Histogram, rows, pi, mu, var, floor):
    """One EM step for groups ``rows``.  Arrays are [G, C, B] so reductions
    over components run along a middle axis (fast in numpy)."""
    weight, mean, spread = (a[rows][:, None, :] for a in (hist.weight, hist.mean, hist.var))
    log_joint = _expected_log_joint(mean, spread, pi, mu, var)
    top = log_joint.max(axis=1, keepdims=True)
    evidence = np.log(np.exp(log_joint - top).sum(axis=1, keepdims=True)) + top
    loglik = (weight * evidence).sum(axis=(1, 2))
    resp = np.exp(log_joint - evidence) * weight
    mass = resp.sum(axis=2)
    safe = np.maximum(mass, _TINY)
    new_mu = (resp * mean).sum(axis=2) / safe
    deviation = (mean - new_mu[:, :, None]) ** 2 + spread
    new_var = np.maximum((resp * deviation).sum(axis=2) / safe, floor)
    keep = mass > 0  # an emptied component keeps its place (and weight 0)
    new_pi = mass / mass.sum(axis=1, keepdims=True)
    return loglik, new_pi, np.where(keep, new_mu, mu), np.where(keep, new_var, var)


def _expected_log_joint(mean, spread, pi, mu, var):
    """log pi_c + E[log N(v | mu_c, var_c)] over the values v of each bin."""
    deviation = (mean - mu[:, :, None]) ** 2 + spread
    with np.errstate(divide="ignore"):
        log_pi = np.log(pi)[:, :, None]
    return log_pi - 0.5 * (np.log(2 * np.pi * var)[:, :, None] + deviation / var[:, :, None])


def _merge_components(pi, mu, var, merge_kl: float) -> np.ndarray:
    """Merge, per group, the closest pair (symmetric KL) while it is below
    ``merge_kl``; the survivor takes the pair's matched moments.  Components
    that lost all weight are dropped.  Returns the [G, C] survivor mask and
    updates pi, mu, var in place."""
    groups, components = pi.shape
    alive = pi > 0
    rows = np.arange(groups)
    for _ in range(components - 1):
        divergence = _symmetric_kl(mu, var)
        divergence[~(alive[:, :, None] & alive[:, None, :])] = np.inf
        divergence[:, np.arange(components), np.arange(components)] = np.inf
        pair = divergence.reshape(groups, -1).argmin(axis=1)
        first, second = np.divmod(pair, components)
        merge = divergence.reshape(groups, -1)[rows, pair] < merge_kl
        if not merge.any():
            break
        g, a, b = rows[merge], first[merge], second[merge]
        weight = pi[g, a] + pi[g, b]
        mean = (pi[g, a] * mu[g, a] + pi[g, b] * mu[g, b]) / weight
        second_moment = (pi[g, a] * (var[g, a] + mu[g, a] ** 2) + pi[g, b] * (var[g, b] + mu[g, b] ** 2)) / weight
        floor = np.minimum(var[g, a], var[g, b])  # guards against rounding below zero
        pi[g, a], mu[g, a], var[g, a] = weight, mean, np.maximum(second_moment - mean * mean, floor)
        pi[g, b], alive[g, b] = 0.0, False
    return alive


def _symmetric_kl(mu, var):
    """KL(p||q) + KL(q||p) for every pair of 1-D Gaussians: [G, C, C]."""
    gap = (mu[:, :, None] - mu[:, None, :]) ** 2
    vp, vq = var[:, :, None], var[:, None, :]
    return 0.5 * ((vp + gap) / vq + (vq + gap) / vp) - 1.0


_GMM_CHUNK = 1 << 16  # weights per chunk when scoring every weight


def _gmm_binning(data, center, pi, mu, var, alive) -> tuple[Binning, int]:
    """Snap every weight to the mean of its most probable live component."""
    width = int(alive.sum(axis=1).max())
    label_dtype = _label_dtype(width)
    codebook = np.empty((data.shape[0], width))
    labels = np.empty(data.shape, dtype=label_dtype)
    for g in range(data.shape[0]):
        live = np.flatnonzero(alive[g])
        order = live[np.argsort(mu[g, live], kind="stable")]
        codebook[g] = _pad_row(mu[g, order] + center[g], width)
        # log pi + log N(v) = a v^2 + b v + c, scored in chunks of weights
        a = -0.5 / var[g, order]
        b = mu[g, order] / var[g, order]
        c = np.log(pi[g, order]) - 0.5 * (np.log(2 * np.pi * var[g, order]) + mu[g, order] ** 2 / var[g, order])
        values = data[g] - center[g]
        for start in range(0, values.size, _GMM_CHUNK):
            v = values[start : start + _GMM_CHUNK, None]
            labels[g, start : start + _GMM_CHUNK] = np.argmax((a * v + b) * v + c, axis=1)
    return Binning(codebook, labels), width
