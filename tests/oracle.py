"""A float64 numpy oracle of SEVO_SPEC.md §2-§3, written from the spec, not from the library."""

from __future__ import annotations

import numpy as np


def normalize(a: np.ndarray) -> np.ndarray:
    deg = a.sum(axis=1)
    inv = np.where(deg > 0, 1.0 / np.sqrt(np.where(deg > 0, deg, 1.0)), 0.0)
    return inv[:, None] * a * inv[None, :]


def psi(x: np.ndarray, a_norm: np.ndarray, beta: float, num_layers: int, approx: str) -> np.ndarray:
    if approx == "iterative":
        y = x.copy()
        for _ in range(num_layers):
            y = beta * a_norm @ y + (1 - beta) * x
        return y
    total, term = x.copy(), x.copy()
    for l in range(1, num_layers + 1):
        term = a_norm @ term
        total = total + beta**l * term
    if approx == "nsa":
        return (1 - beta) * total
    return (1 - beta) / (1 - beta ** (num_layers + 1)) * total


def psi_star(x: np.ndarray, a_norm: np.ndarray, beta: float) -> np.ndarray:
    n = a_norm.shape[0]
    return (1 - beta) * np.linalg.solve(np.eye(n) - beta * a_norm, x)


def smoothness(x: np.ndarray, a_norm: np.ndarray) -> float:
    return float(np.trace(x.T @ (np.eye(a_norm.shape[0]) - a_norm) @ x))


class Oracle:
    """One optimizer of spec §3 over a dict of float64 params; ``smooth`` names the SEvo tables.

    kind: "adamw" (AdamW + SEvo with moment correction), "adam" (L2 decay, no correction) or
    "sgd" (optional momentum / Nesterov). Tables in ``smooth`` are stacked in the given order.
    """

    def __init__(self, kind, params, smooth, a_norm, *, lr, beta, num_layers, approx,
                 b1=0.9, b2=0.999, eps=1e-8, wd=0.0, momentum=None, nesterov=False):
        self.kind, self.smooth, self.a = kind, list(smooth), a_norm
        self.lr, self.beta, self.L, self.approx = lr, beta, num_layers, approx
        self.b1, self.b2, self.eps, self.wd = b1, b2, eps, wd
        self.momentum, self.nesterov = momentum, nesterov
        self.p = {k: np.array(v, np.float64) for k, v in params.items()}
        self.m = {k: np.zeros_like(v) for k, v in self.p.items()}
        self.v = {k: np.zeros_like(v) for k, v in self.p.items()}
        self.buf = {}
        self.t = 0

    def _psi_tables(self, d):
        stacked = np.concatenate([d[k] for k in self.smooth])
        out = psi(stacked, self.a, self.beta, self.L, self.approx)
        offs = np.cumsum([0] + [d[k].shape[0] for k in self.smooth])
        for i, k in enumerate(self.smooth):
            d[k] = out[offs[i]:offs[i + 1]]
        return d

    def step(self, grads):
        self.t += 1
        t, b1, b2 = self.t, self.b1, self.b2
        g = {k: np.array(v, np.float64) for k, v in grads.items()}
        d = {}
        if self.kind == "adamw":
            for k in self.p:
                self.p[k] = self.p[k] * (1 - self.lr * self.wd)
            s = max(1, t - 1)
            for k in self.p:
                m_in, v_in = g[k], g[k] ** 2
                if k in self.smooth:
                    z = np.all(g[k] == 0, axis=1, keepdims=True)
                    m_in = np.where(z, self.m[k] / (1 - b1**s), g[k])
                    v_in = np.where(z, self.v[k] / (1 - b2**s), g[k] ** 2)
                self.m[k] = b1 * self.m[k] + (1 - b1) * m_in
                self.v[k] = b2 * self.v[k] + (1 - b2) * v_in
                d[k] = (self.m[k] / (1 - b1**t)) / (np.sqrt(self.v[k] / (1 - b2**t)) + self.eps)
        elif self.kind == "adam":
            for k in self.p:
                gk = g[k] + self.wd * self.p[k]
                self.m[k] = b1 * self.m[k] + (1 - b1) * gk
                self.v[k] = b2 * self.v[k] + (1 - b2) * gk**2
                d[k] = (self.m[k] / (1 - b1**t)) / (np.sqrt(self.v[k] / (1 - b2**t)) + self.eps)
        else:
            for k in self.p:
                dk = g[k] + self.wd * self.p[k]
                if self.momentum:
                    mu = self.momentum
                    self.buf[k] = dk if t == 1 else mu * self.buf[k] + dk
                    dk = dk + mu * self.buf[k] if self.nesterov else self.buf[k]
                d[k] = dk
        d = self._psi_tables(d)
        for k in self.p:
            self.p[k] = self.p[k] - self.lr * d[k]
        return self.p
