"""Representation similarity (spec 08): linear and minibatch CKA on inputs whose answer is known, 2 ranks against
one process, and the `similarity` subcommand on trained checkpoints."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from lightning_modules.statistics.similarity import (
    MinibatchCKA,
    features,
    hollow_grams,
    linear_cka,
    unbiased_hsic,
    unbiased_hsic_self,
)
from tests.conftest import CONFIGS, QUIET, cli, cli_error, on_two_gloo_ranks


def related(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two feature sets of the same n samples sharing 8 latent directions: x linear in them, y a tanh of half."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 8, generator=g)
    x = torch.cat([z, torch.randn(n, 24, generator=g)], 1) @ torch.randn(32, 32, generator=g)
    y = torch.tanh(torch.cat([z[:, :4], 0.3 * torch.randn(n, 12, generator=g)], 1) @ torch.randn(16, 16, generator=g))
    return x.double(), y.double()  # float64: the invariances below hold to rounding


def minibatch_cka(x: torch.Tensor, y: torch.Tensor, b: int) -> float:
    cka = MinibatchCKA(1, 1)
    for i in range(0, len(x), b):
        cka.update([x[i : i + b]], [y[i : i + b]])
    return float(cka.compute())


def test_cka_of_a_representation_with_itself_is_one():
    x, _ = related(600, 0)
    assert float(linear_cka(x, x)) == pytest.approx(1, abs=1e-12)
    assert minibatch_cka(x, x, 100) == pytest.approx(1, abs=1e-12)


def test_cka_is_invariant_to_an_orthogonal_transform_and_isotropic_scaling():
    x, y = related(600, 1)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    before = float(linear_cka(x, y))
    assert float(linear_cka(3.7 * x @ q, y)) == pytest.approx(before, rel=1e-10)
    assert minibatch_cka(3.7 * x @ q, 0.2 * y, 100) == pytest.approx(minibatch_cka(x, y, 100), rel=1e-10)


def test_cka_is_not_invariant_to_a_general_invertible_map():
    x, _ = related(600, 3)
    stretch = torch.diag(torch.logspace(0, 2, 32, dtype=torch.float64))  # invertible, far from orthogonal
    assert float(linear_cka(x, x @ stretch)) < 0.9
    assert minibatch_cka(x, x @ stretch, 100) < 0.9


def test_minibatch_cka_equals_full_batch_cka_on_a_split_held_whole():
    x, y = related(4000, 4)
    full = float(linear_cka(x, y))
    assert 0.2 < full < 0.9  # neither trivially similar nor unrelated
    # the unbiased HSIC's minibatch estimate differs from the biased full-batch one by O(1 / b) and its noise by
    # O(1 / sqrt(n)); 0.02 is several times both at b = 250, n = 4000
    assert minibatch_cka(x, y, 250) == pytest.approx(full, abs=0.02)


def test_the_unbiased_hsic_of_independent_features_averages_to_zero_where_the_biased_does_not():
    g = torch.Generator().manual_seed(5)
    unbiased, biased = [], []
    for _ in range(200):
        x, y = torch.randn(20, 3, generator=g), torch.randn(20, 3, generator=g)
        unbiased.append(float(unbiased_hsic(hollow_grams([x]), hollow_grams([y]))))
        h = torch.eye(20, dtype=torch.float64) - 1 / 20  # centring: the biased HSIC tr(K H L H) / (n - 1)^2
        k, m = x.double() @ x.double().T, y.double() @ y.double().T
        biased.append(float(torch.trace(k @ h @ m @ h)) / 19**2)
    spread = torch.tensor(unbiased).std() / 200**0.5
    assert abs(sum(unbiased) / 200) < 4 * spread
    assert sum(biased) / 200 > 10 * spread  # its bias is of the order of the signal it measures


def test_hollow_grams_and_the_pairwise_hsic_match_the_formula_pair_by_pair():
    g = torch.Generator().manual_seed(6)
    a = [torch.randn(9, 4, generator=g), torch.randn(9, 2, generator=g)]
    b = [torch.randn(9, 3, generator=g)]
    k, m = hollow_grams(a), hollow_grams(b)
    for p in range(2):
        kp, lq = k[p], m[0]
        one = torch.ones(9, dtype=torch.float64)
        expected = torch.trace(kp @ lq) + (one @ kp @ one) * (one @ lq @ one) / (8 * 7) - 2 / 7 * one @ kp @ lq @ one
        assert float(unbiased_hsic(k, m)[p, 0]) == pytest.approx(float(expected / (9 * 6)), rel=1e-12)
    assert torch.all(torch.diagonal(k, dim1=1, dim2=2) == 0)
    torch.testing.assert_close(unbiased_hsic_self(k), torch.diagonal(unbiased_hsic(k, k)), rtol=1e-12, atol=1e-12)


def test_conv_features_are_pooled_over_positions_or_flattened():
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    assert torch.equal(features(x, "pool"), x.mean(dim=(2, 3)))
    assert features(x, "flatten").shape == (2, 12)


def test_minibatches_of_fewer_than_four_samples_are_refused():
    with pytest.raises(ValueError, match="4 or more"):
        MinibatchCKA(1, 1).update([torch.randn(3, 2)], [torch.randn(3, 2)])


def every_other_minibatch(rank: int) -> torch.Tensor:
    x, y = related(800, 7)
    cka = MinibatchCKA(2, 1)
    for i in range(rank * 100, 800, 200):  # each rank every other minibatch of 100
        cka.update([x[i : i + 100], x[i : i + 100, :5]], [y[i : i + 100]])
    return cka.compute()


@pytest.mark.subprocess
def test_two_ranks_with_half_the_minibatches_each_give_what_one_process_gives_on_all(tmp_path):
    ranks = on_two_gloo_ranks(every_other_minibatch, tmp_path)
    x, y = related(800, 7)
    one = MinibatchCKA(2, 1)
    for i in range(0, 800, 100):
        one.update([x[i : i + 100], x[i : i + 100, :5]], [y[i : i + 100]])
    assert torch.equal(ranks[0], ranks[1])
    torch.testing.assert_close(ranks[0], one.compute(), rtol=1e-12, atol=0)


def trained_checkpoint(root: Path, name: str, epochs: int) -> Path:
    cli("fit", "--config", CONFIGS / "quickstart.yaml", "--trainer.max_epochs", str(epochs),
        "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1", "--name", name, *QUIET)  # fmt: skip
    return next((root / "runs" / name).rglob("last.ckpt"))


def cka_rows(root: Path) -> list[dict]:
    return list(csv.DictReader(next((root / "runs" / "similarity").rglob("similarity.csv")).open()))


def test_the_subcommand_maps_one_nets_layers_and_two_checkpoints_layers(in_tmp):
    early = trained_checkpoint(in_tmp, "early", 1)
    cli("similarity", "--config", CONFIGS / "quickstart.yaml", "--checkpoints", early, "--name", "similarity", *QUIET)
    rows = cka_rows(in_tmp)
    layers = list(dict.fromkeys(r["a"] for r in rows))
    assert len(layers) >= 3 and len(rows) == len(layers) ** 2
    cka = {(r["a"], r["b"]): float(r["cka"]) for r in rows}
    assert all(cka[n, n] == pytest.approx(1, abs=1e-9) for n in layers)
    assert all(cka[a, b] == pytest.approx(cka[b, a], abs=1e-9) for a in layers for b in layers)
    folder = next((in_tmp / "runs" / "similarity").iterdir())
    assert (folder / "similarity.png").stat().st_size > 0 and "against" in (folder / "similarity.md").read_text()

    late = trained_checkpoint(in_tmp, "late", 3)
    cli("similarity", "--config", CONFIGS / "quickstart.yaml", "--checkpoints", f"[{early},{late}]", "--name",
        "similarity", *QUIET)  # fmt: skip
    rows = [r for r in csv.DictReader(next(p for p in sorted((in_tmp / "runs" / "similarity").iterdir()) if p.name
            == "version_1").joinpath("similarity.csv").open())]  # fmt: skip
    across = {(r["a"], r["b"]): float(r["cka"]) for r in rows}
    assert all(0 < across[n, n] <= 1 + 1e-9 for n in layers)
    assert any(across[n, n] < 1 - 1e-6 for n in layers)  # training moved some layer's representation


def test_the_subcommand_refuses_what_it_cannot_compare(in_tmp, capsys):
    assert "similarity needs --checkpoints" in cli_error("similarity", "--config", CONFIGS / "quickstart.yaml", *QUIET,
                                                         capsys=capsys)  # fmt: skip
    message = cli_error("similarity", "--config", CONFIGS / "quickstart.yaml", "--checkpoints", "any.ckpt",
                        "--teacher", "true", *QUIET, capsys=capsys)  # fmt: skip
    assert "needs a student's config" in message
    message = cli_error("similarity", "--config", CONFIGS / "quickstart.yaml", "--checkpoints", "missing.ckpt",
                        *QUIET, capsys=capsys)  # fmt: skip
    assert "missing.ckpt" in message and "Traceback" not in message
