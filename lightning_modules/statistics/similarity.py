"""Representation similarity (spec 08): linear CKA (Kornblith et al., 2019), and minibatch CKA with the unbiased
HSIC (Nguyen, Raghu and Kornblith, 2021; Song et al., 2012), streamed over minibatches and summed over ranks."""

from __future__ import annotations

import torch

from lightning_modules.collectives import sum_over_ranks


def features(output: torch.Tensor, conv: str = "pool") -> torch.Tensor:
    """A layer's output as one row per sample: a conv's (N, C, H, W) averaged over positions (`pool`, C columns) or
    flattened (`flatten`, C H W columns); anything else flattened."""
    if output.dim() > 2 and conv == "pool":
        return output.flatten(2).mean(dim=2)
    return output.flatten(1)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) of the features centred over the samples (rows), in float64."""
    x = x.double() - x.double().mean(dim=0)
    y = y.double() - y.double().mean(dim=0)
    return torch.linalg.matrix_norm(y.T @ x) ** 2 / (
        torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    )


def hollow_grams(rows: list[torch.Tensor]) -> torch.Tensor:
    """The Gram matrices K = X X^T of a minibatch's features, one per layer, with their diagonals set to 0:
    (layers, b, b) in float64."""
    grams = torch.stack([(x.double() @ x.double().T) for x in rows])
    return grams * (1 - torch.eye(grams.shape[-1], dtype=grams.dtype, device=grams.device))


def unbiased_hsic(k: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """HSIC_1 of every pair of hollow Gram matrices of one minibatch, K (P, b, b) x L = g (Q, b, b) -> (P, Q):
    [tr(K L) + (1^T K 1)(1^T L 1) / ((b - 1)(b - 2)) - 2 / (b - 2) 1^T K L 1] / (b (b - 3)); b > 3."""
    row_k, row_l = k.sum(dim=2), g.sum(dim=2)  # K 1, L 1
    trace = torch.einsum("pij,qij->pq", k, g)  # tr(K L) = sum K * L: Gram matrices are symmetric
    return hsic_of(trace, row_k.sum(dim=1)[:, None] * row_l.sum(dim=1)[None, :], row_k @ row_l.T, k.shape[-1])


def unbiased_hsic_self(k: torch.Tensor) -> torch.Tensor:
    """HSIC_1(K, K) of each hollow Gram matrix (P, b, b) -> (P,): the diagonal of `unbiased_hsic(k, k)` alone."""
    rows = k.sum(dim=2)
    return hsic_of(k.square().sum(dim=(1, 2)), rows.sum(dim=1).square(), rows.square().sum(dim=1), k.shape[-1])


def hsic_of(trace: torch.Tensor, total: torch.Tensor, cross: torch.Tensor, b: int) -> torch.Tensor:
    """The unbiased HSIC from its three sums over a minibatch of b: tr(K L), (1^T K 1)(1^T L 1) and 1^T K L 1."""
    return (trace + total / ((b - 1) * (b - 2)) - 2 / (b - 2) * cross) / (b * (b - 3))


class MinibatchCKA:
    """The CKA map of two lists of layers (P and Q of them), streamed: per minibatch the unbiased HSIC of every
    pair, of every layer with itself, and the count; CKA = mean HSIC(K, L) / sqrt(mean HSIC(K, K) mean HSIC(L, L)).
    Under DDP the sums and the count are summed over ranks, so ranks with their own minibatches give the map one
    process gives on all of them."""

    def __init__(self, p: int, q: int, device: torch.device | str = "cpu") -> None:
        self.cross = torch.zeros(p, q, dtype=torch.float64, device=device)  # sum of HSIC(K_p, L_q)
        self.self_a = torch.zeros(p, dtype=torch.float64, device=device)  # sum of HSIC(K_p, K_p)
        self.self_b = torch.zeros(q, dtype=torch.float64, device=device)
        self.batches = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
        """One minibatch: each layer's features (samples as rows, the same samples on both sides)."""
        size = len(a[0])
        if size < 4:
            raise ValueError(f"minibatch CKA needs minibatches of 4 or more samples, not {size}")
        k, g = hollow_grams(a), hollow_grams(b)
        self.cross += unbiased_hsic(k, g)
        self.self_a += unbiased_hsic_self(k)
        self.self_b += unbiased_hsic_self(g)
        self.batches += 1

    def compute(self) -> torch.Tensor:
        """The (P, Q) CKA map over every rank's minibatches (a collective under DDP: every rank calls it)."""
        cross, self_a, self_b, batches = sum_over_ranks([self.cross, self.self_a, self.self_b, self.batches])
        if batches == 0:
            raise ValueError("minibatch CKA saw no minibatch")
        return cross / torch.sqrt(self_a[:, None] * self_b[None, :])  # the counts cancel: means are sums / batches
