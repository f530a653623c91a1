import math

import pytest
import torch
from torch import nn

from resnorm import create_model
from resnorm.data import DataSplit
from resnorm.train import TrainConfig, evaluate, fit


def _blobs(n=400, classes=3, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(classes, dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, dim, generator=g)
    cut = n * 3 // 4
    return DataSplit("blobs", x[:cut], y[:cut], x[cut:], y[cut:], classes)


def test_fit_learns_and_reports_every_epoch():
    data = _blobs()
    model = create_model("mlp", in_features=8, num_classes=3, depth=2, width=16)
    result = fit(model, data, TrainConfig(epochs=4, batch_size=32, lr=1e-2), progress=False)
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4]
    assert set(result.history[0]) == {"epoch", "train_loss", "train_acc", "test_loss", "test_acc"}
    assert result.final["test_acc"] > 0.9  # well-separated blobs; chance is 1/3
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert not result.diverged and result.seconds > 0


def test_fit_is_deterministic_for_a_seed():
    data = _blobs()
    runs = []
    for _ in range(2):
        torch.manual_seed(1234)
        model = create_model("mlp", in_features=8, num_classes=3, depth=2, width=16)
        runs.append((model, fit(model, data, TrainConfig(epochs=2, batch_size=32, seed=7),
                                progress=False)))
    (m1, r1), (m2, r2) = runs
    assert r1.history == r2.history
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)


class _Explodes(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 3)

    def forward(self, x):
        return self.linear(x) * float("nan")


def test_divergence_stops_cleanly():
    result = fit(_Explodes(), _blobs(), TrainConfig(epochs=3, batch_size=50), progress=False)
    assert result.diverged and result.diverged_at_step == 1
    assert result.history == [] and result.to_dict()["diverged"] is True


def test_evaluate_restores_mode_and_matches_manual():
    data = _blobs()
    model = create_model("mlp", in_features=8, num_classes=3, depth=1, width=16).train()
    loss, acc = evaluate(model, data.x_test, data.y_test, batch_size=7)
    assert model.training
    model.eval()
    with torch.no_grad():
        logits = model(data.x_test)
    assert math.isclose(loss, nn.functional.cross_entropy(logits, data.y_test).item(), rel_tol=1e-5)
    assert acc == (logits.argmax(1) == data.y_test).sum().item() / len(data.y_test)


@pytest.mark.parametrize("kwargs, error", [
    ({"epochs": 0}, ValueError), ({"batch_size": 0}, ValueError), ({"lr": 0.0}, ValueError),
    ({"weight_decay": -1.0}, ValueError), ({"epochs": 1.5}, TypeError),
])
def test_config_rejects_bad_values(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        TrainConfig(**kwargs)


def test_fit_rejects_a_dict_config():
    with pytest.raises(TypeError, match="TrainConfig"):
        fit(nn.Linear(8, 3), _blobs(), {"epochs": 1})
