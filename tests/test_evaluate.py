"""hvae_fast.evaluate: the IW estimator exactly, and evaluations that leave the caller's
RNG and the model's mode as they were."""
import math

import pytest
import torch
from torch import nn

from hvae_fast import evaluate as E
from hvae_fast.model import TopDownVAE


class StubWeights(nn.Module):
    """log_weight of a row is g(e, s) = -(e + 1) * (s + 1) / 7 + sin(s): example e (its id
    in column 0) at its s-th sample, counting the rows of e seen so far in call order, as
    the estimator repeats each example over its samples."""

    latent_dims = (1,)

    def __init__(self):
        super().__init__()
        self.seen = {}

    def row_bytes(self, x):  # tiny: the memory budget never limits the chunks asked for
        return 8

    def log_weight(self, rows):
        out = []
        for e in rows[:, 0].long().tolist():
            s = self.seen.get(e, 0)
            self.seen[e] = s + 1
            out.append(-(e + 1) * (s + 1) / 7 + math.sin(s))
        return torch.tensor(out, dtype=torch.float64).float()


def expected_iw(n, K):
    g = torch.tensor([[-(e + 1) * (s + 1) / 7 + math.sin(s) for s in range(K)] for e in range(n)],
                     dtype=torch.float64)
    return (torch.logsumexp(g.float().double(), 1) - math.log(K)).float()


@pytest.mark.parametrize("K", [1, 5, 64])
@pytest.mark.parametrize("max_rows", [10_000, 7, 3, 1])  # all at once, then ever smaller chunks
def test_iw_estimator_is_exact(K, max_rows):
    n = 5
    x = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3)
    stub = StubWeights()
    got = E.iw_log_likelihood(stub, x, samples=K, max_rows=max_rows)
    assert got.shape == (n,)
    assert stub.seen == {e: K for e in range(n)}  # every example exactly K samples
    torch.testing.assert_close(got, expected_iw(n, K), rtol=0, atol=1e-6)


def small_model():
    torch.manual_seed(0)
    return TopDownVAE.from_config(levels=2, D=12, num_vals=5, M=16, L=2)


def test_iw_with_one_sample_is_the_weight_of_the_same_draw():
    model = small_model().eval()
    x = torch.randint(0, 5, (6, 12)).float()
    torch.manual_seed(3)
    iw = E.iw_log_likelihood(model, x, samples=1)
    torch.manual_seed(3)
    with torch.no_grad():
        lw = model.log_weight(x)
    torch.testing.assert_close(iw, lw, rtol=0, atol=1e-6)


@pytest.mark.parametrize("fn", [
    lambda m, x: E.evaluate(m, x, iw_samples=4, seed=5),
    lambda m, x: E.elbo(m, x),
    lambda m, x: E.iw_log_likelihood(m, x, samples=3),
    lambda m, x: E.active_units(m, x),
], ids=["evaluate", "elbo", "iw", "active_units"])
def test_evaluation_leaves_the_mode(fn):
    model = small_model().train()
    fn(model, torch.randint(0, 5, (6, 12)).float())
    assert model.training
    assert all(m.training for m in model.modules())


def test_evaluate_leaves_the_callers_rng_alone_and_is_seeded():
    model = small_model()
    x = torch.randint(0, 5, (6, 12)).float()
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = E.evaluate(model, x, iw_samples=4, seed=5)
    assert torch.equal(torch.rand(3), expected_next)  # as if evaluate had not run
    assert E.evaluate(model, x, iw_samples=4, seed=5) == first
    assert E.evaluate(model, x, iw_samples=4, seed=6)["iw_nll"] != first["iw_nll"]


def test_a_collapsed_level_has_no_active_units_by_kl():
    model = small_model()
    for p in model.deltas[0].parameters():  # level 1's delta network outputs zeros: q(z1) = p(z1 | z2)
        torch.nn.init.zeros_(p)
    x = torch.randint(0, 5, (64, 12)).float()
    kl = model.eval().kl_per_dim(x)
    assert float(kl[0].abs().max()) < 1e-6  # zero up to rounding
    assert E.active_units(model, x)[0] == 0
    assert E.active_units(model, x)[1] > 0  # the level above is in use
    # the covariance count still calls z1 active: its mean mu_p(z2) varies with x
    assert E.active_units_cov(model, x)[0] > 0


def test_kl_per_dim_sums_to_the_elbos_kl():
    model = small_model().eval()
    x = torch.randint(0, 5, (8, 12)).float()
    torch.manual_seed(4)
    per_dim = model.kl_per_dim(x)
    torch.manual_seed(4)
    terms = model.elbo_terms(x)
    for a, b in zip(per_dim, terms.kl):
        torch.testing.assert_close(a.sum(1), b, rtol=1e-5, atol=1e-5)


class WideStub(StubWeights):
    """The stub with a layer whose output per row is 1 MB, as a 256-way head over 1,000 pixels is."""
    row_bytes = None  # measured by hvae_fast.evaluate.row_bytes's probe

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 250_000, bias=False)
        self.calls = []

    def log_weight(self, rows):
        self.layer(rows)
        self.calls.append(len(rows))
        return super().log_weight(rows)


def test_one_rows_cost_is_measured_on_the_model():
    stub = WideStub()
    x = torch.arange(6, dtype=torch.float32)[:, None].repeat(1, 3)
    assert E.row_bytes(stub, x) >= 2 * 250_000 * 4  # the wide layer's output, twice
    assert stub.calls == [1]  # one probe row
    big = TopDownVAE.from_config(levels=2, D=784, num_vals=256, M=32, L=2)
    small = TopDownVAE.from_config(levels=2, D=64, num_vals=17, M=32, L=2)
    xb, xs = torch.zeros(2, 784), torch.zeros(2, 64)
    assert E.row_bytes(big, xb) > 784 * 256 * 4 * 2 > E.row_bytes(small, xs)  # the head's logits count


def test_chunks_are_sized_from_the_memory_budget():
    stub = WideStub()
    x = torch.arange(6, dtype=torch.float32)[:, None].repeat(1, 3)
    per_row = 2_000_000
    stub.row_bytes = lambda x: per_row
    got = E.iw_log_likelihood(stub, x, samples=10, memory=8 * per_row)
    assert max(stub.calls) <= 8 and sum(stub.calls) == 60  # never more rows than the budget holds
    torch.testing.assert_close(got, expected_iw(6, 10), rtol=0, atol=1e-6)  # the same numbers, in chunks


def test_bits_per_dim_of_images_count_every_value_of_an_example():
    from hvae_fast.model import ConvTopDownVAE
    torch.manual_seed(0)
    model = ConvTopDownVAE((1, 8, 8), num_vals=4, channels=8, latent_channels=2, groups=(1, 1, 1))
    x = torch.randint(0, 4, (6, 1, 8, 8))
    e = E.evaluate(model, x, iw_samples=0)
    assert e["bpd_elbo"] == pytest.approx(e["neg_elbo"] / (64 * math.log(2)))  # not / C
    images = E.evaluate(model, x, iw_samples=3, seed=1)
    rows = E.evaluate(model, x.view(6, 64), iw_samples=3, seed=1)
    assert images["neg_elbo"] == rows["neg_elbo"] and images["iw_nll"] == rows["iw_nll"]
    assert images["bpd_elbo"] == rows["bpd_elbo"] == pytest.approx(images["neg_elbo"] / (64 * math.log(2)))
    assert images["bpd"] == rows["bpd"] == pytest.approx(images["iw_nll"] / (64 * math.log(2)))


def test_the_report_keeps_each_examples_iw_log_likelihood_and_which_examples():
    torch.manual_seed(0)
    m = TopDownVAE.from_config(levels=2, D=6, num_vals=4, M=8, L=2)
    x = torch.randint(0, 4, (9, 6)).float()
    r = E.evaluate(m, x, iw_samples=5, iw_subset=4, seed=3)
    idx = torch.randperm(9, generator=torch.Generator().manual_seed(3))[:4].tolist()
    assert r["iw_indices"] == idx and r["D"] == 6 and len(r["iw_log_px"]) == 4
    assert r["iw_nll"] == pytest.approx(-sum(r["iw_log_px"]) / 4, rel=1e-12)
    with E.seeded(3, torch.device("cpu")):  # the same noise as the report's: elbo, active units, then IW
        E.elbo(m, x), E.active_units(m, x), E.active_units_cov(m, x)
        again = E.iw_log_likelihood(m, x[idx], 5).double()
    assert r["iw_log_px"] == again.tolist()
    everything = E.evaluate(m, x, iw_samples=5, seed=3)
    assert everything["iw_indices"] == list(range(9))


def test_paired_difference_is_the_mean_and_standard_error_of_the_per_example_differences():
    a = {"n": 10, "iw_n": 3, "D": 4, "iw_indices": [2, 7, 5], "iw_log_px": [-10.0, -20.0, -30.0]}
    b = {**a, "iw_log_px": [-9.0, -18.0, -30.0]}  # b is better on two images: differences 1, 2, 0
    d = E.paired_difference(a, b)
    assert d["n"] == 3 and d["diff"] == pytest.approx(1.0) and d["se"] == pytest.approx(1.0 / math.sqrt(3))
    assert d["diff_bpd"] == pytest.approx(1.0 / (4 * math.log(2)))
    assert E.paired_difference(b, a)["diff"] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="different examples"):
        E.paired_difference(a, {**b, "iw_indices": [2, 7, 6]})
    with pytest.raises(ValueError, match="report b holds no per-example"):
        E.paired_difference(a, {k: v for k, v in b.items() if k != "iw_log_px"})
