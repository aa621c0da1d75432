"""FGSM, PGD and CW: perturbation bounds, effect on a trained digits-cnn, the model untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import unitscope
from unitscope.attacks import attack, cw, fgsm, pgd
from unitscope.train import train

from .conftest import hook_counts


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = unitscope.load_model("digits-cnn")
    train(model, unitscope.load_dataset("digits", "train"), epochs=3, lr=5e-3, batch_size=32, seed=0,
          device="cpu")
    model.eval().zero_grad(set_to_none=True)
    data = unitscope.load_dataset("digits", "test")
    x = torch.stack([data[i][0] for i in range(64)])
    y = torch.tensor([int(data[i][1]) for i in range(64)])
    keep = model(x).argmax(1) == y
    assert keep.float().mean() > 0.7  # the model is trained
    return model, x[keep], y[keep]


def _loss(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


def test_fgsm_stays_in_the_eps_ball_and_raises_the_loss(trained):
    model, x, y = trained
    adv = fgsm(model, x, y, eps=0.1)
    assert (adv - x).abs().max() <= 0.1 + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert _loss(model, adv, y).mean() > _loss(model, x, y).mean()


def test_pgd_stays_in_the_ball_and_flips_most_predictions(trained):
    model, x, y = trained
    adv = pgd(model, x, y, eps=0.3, alpha=0.1, steps=10)
    assert (adv - x).abs().max() <= 0.3 + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        flipped = (model(adv).argmax(1) != y).float().mean()
    assert flipped > 0.8
    assert torch.equal(adv, pgd(model, x, y, eps=0.3, alpha=0.1, steps=10))  # seeded start


def test_pgd_is_stronger_than_fgsm_at_the_same_eps(trained):
    model, x, y = trained
    assert _loss(model, pgd(model, x, y, eps=0.1, alpha=0.03, steps=10), y).mean() >= \
        _loss(model, fgsm(model, x, y, eps=0.1), y).mean()


def test_cw_flips_predictions_with_a_small_l2_perturbation(trained):
    model, x, y = trained
    adv = cw(model, x, y, c=5.0, steps=60, lr=0.05)
    with torch.no_grad():
        flipped = model(adv).argmax(1) != y
    assert flipped.float().mean() > 0.5
    assert adv.min() >= 0 and adv.max() <= 1
    l2 = (adv - x).flatten(1).norm(dim=1)[flipped]
    assert l2.max() < (x.flatten(1).norm(dim=1)).min()  # well inside the image's own norm


def test_attacks_leave_the_model_as_it_was(trained):
    model, x, y = trained
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for method in ("fgsm", "pgd", "cw"):
        options = {"steps": 3} if method != "fgsm" else {}
        attack(model, x[:8], y[:8], method, eps=0.1, batch_size=3, **options)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in model.parameters())
    assert hook_counts(model) == 0
    model.eval()


def test_batched_equals_whole(trained):
    model, x, y = trained
    torch.testing.assert_close(attack(model, x, y, "fgsm", eps=0.2, batch_size=5), fgsm(model, x, y, 0.2))


def test_cw_takes_its_own_constant_not_eps(trained):
    model, x, y = trained
    x, y = x[:6], y[:6]
    direct = cw(model, x, y, c=1.0, steps=8)
    torch.testing.assert_close(attack(model, x, y, "cw", eps=0.3, steps=8), direct)  # default c = 1
    torch.testing.assert_close(attack(model, x, y, "cw", eps=0.01, c=1.0, steps=8), direct)
    assert not torch.equal(attack(model, x, y, "cw", c=20.0, steps=8), direct)


def test_bad_input():
    net = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="unknown attack"):
        attack(net, torch.rand(2, 3), torch.tensor([0, 1]), "deepfool")
    with pytest.raises(ValueError, match="3 inputs but 2 labels"):
        fgsm(net, torch.rand(3, 3), torch.tensor([0, 1]))
