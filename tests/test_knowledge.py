"""The label knowledge (knowledge.py) against networks whose answer is known: one that knows
every class's picture exactly, one that ignores the label, and one that knows half the classes."""

import pytest
import torch

from diffcli.knowledge import SNR, WAYS, candidates, label_gain, label_knowledge, snr_step
from diffcli.objective import Objective
from diffcli.schedules import make_schedule

MEANS = torch.linspace(-0.9, 0.9, 10)  # class k's every image is the constant MEANS[k]


def oracle(schedule, prediction, known=10):
    """For label y, the target x_t implies if x0 were class y's picture: exact for the true
    label. Labels from `known` on are not known: they all read as class 0's picture."""
    def network(x_t, t, y):
        abar = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
        x0 = MEANS[torch.where(y < known, y, 0)].view(-1, 1, 1, 1).expand_as(x_t)
        eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
        return eps if prediction == "eps" else abar.sqrt() * eps - (1 - abar).sqrt() * x0
    return network


def data(n=60):
    labels = torch.arange(n) % 10
    return MEANS[labels].view(-1, 1, 1, 1).expand(n, 1, 4, 4).clone(), labels


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_knowledge_is_one_for_a_network_that_knows_every_class_and_zero_for_one_that_ignores_labels(prediction):
    schedule = make_schedule("cosine", 1000)
    x0, labels = data()
    assert label_knowledge(oracle(schedule, prediction), Objective.ddpm(schedule, prediction), x0, labels, 10,
                           torch.Generator().manual_seed(0)) == 1.0
    # every label read as class 0: all candidates tie, and a tie is no knowledge
    assert label_knowledge(oracle(schedule, prediction, known=0), Objective.ddpm(schedule, prediction), x0, labels, 10,
                           torch.Generator().manual_seed(0)) == 0.0


def test_knowledge_is_the_share_of_classes_known_above_chance():
    """Classes 0-4 known, 5-9 read as class 0: an image of 5-9 ties with candidate 0, and one
    of class 0 with candidates 5-9 (misses), so 4/10 are right against a chance of 1/10:
    (4/10 - 1/10) / (9/10) = 1/3."""
    schedule = make_schedule("linear", 1000)
    x0, labels = data()
    got = label_knowledge(oracle(schedule, "v", known=5), Objective.ddpm(schedule, "v"), x0, labels, 10, torch.Generator().manual_seed(0))
    assert got == pytest.approx(1 / 3)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_the_gain_is_the_share_of_the_error_the_own_label_takes_away(prediction):
    """Against the "no label" index 10, which the oracle reads as class 0's picture: knowing every
    class takes all the error away (1), ignoring labels none (0). Knowing classes 0-4 leaves the
    error of images of classes 5-9, each a constant k steps of MEANS from class 0's picture, and the
    error at one noise level is proportional to (k step)^2 in ε or v alike: 1 - sum(k^2, 5..9) /
    sum(k^2, 1..9) = 1 - 255/285."""
    schedule = make_schedule("cosine", 1000)
    objective, (x0, labels) = Objective.ddpm(schedule, prediction), data()
    for known, want in ((10, 1.0), (0, 0.0), (5, 1 - 255 / 285)):
        got = label_gain(oracle(schedule, prediction, known), objective, x0, labels, 10, torch.Generator().manual_seed(0))
        assert got == pytest.approx(want, abs=1e-6), known


def test_candidates_are_the_own_label_then_distinct_others():
    labels = torch.tensor([0, 7, 29, 13])
    tries = candidates(labels, 30, torch.Generator().manual_seed(0))
    assert tries.shape == (4, WAYS) and torch.equal(tries[:, 0], labels)
    for row in tries:
        assert len(set(row.tolist())) == WAYS and all(0 <= k < 30 for k in row.tolist())
    few = candidates(labels % 3, 3, torch.Generator().manual_seed(0))  # fewer classes than WAYS: all of them
    assert all(sorted(row.tolist()) == [0, 1, 2] for row in few)
    pairs = candidates(labels % 3, 3, torch.Generator().manual_seed(0), ways=2)  # as many tries whatever the class count
    assert pairs.shape == (4, 2) and torch.equal(pairs[:, 0], labels % 3) and bool((pairs[:, 1] != pairs[:, 0]).all())


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_it_is_read_where_the_signal_to_noise_ratio_is_nearest_a_quarter(name):
    abar = make_schedule(name, 1000).alphas_cumprod.double()
    gap = ((abar / (1 - abar)).log() - torch.log(torch.tensor(SNR, dtype=torch.float64))).abs()
    t = snr_step(make_schedule(name, 1000))
    assert gap[t] == gap.min() and gap[t] < 0.01
