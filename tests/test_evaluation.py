"""Classifier evaluation: agreement with scikit-learn, image folders, bad input."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import accuracy_score, matthews_corrcoef, precision_score, recall_score
from sklearn.metrics import confusion_matrix as sk_confusion
from torch import nn

import unitscope
from unitscope.analyses.evaluation import (
    confusion_from_table,
    confusion_table,
    evaluate_classifier,
    plot_confusion,
)
from unitscope.data import ArrayDataset
from unitscope.stats.classification import matthews_corrcoef as unitscope_mcc


def test_agrees_with_sklearn_on_digits():
    torch.manual_seed(0)
    model = unitscope.load_model("digits-cnn")
    data = unitscope.load_dataset("digits", "test")
    table, cm = evaluate_classifier(model, data, batch_size=47, device="cpu")
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.stack([data[i][1] for i in range(len(data))]).numpy()
    with torch.no_grad():
        pred = model(x).argmax(1).numpy()
    assert cm.tolist() == sk_confusion(y, pred, labels=list(range(10))).tolist()
    overall = table[table["class"] == -1].iloc[0]
    assert overall["recall"] == pytest.approx(accuracy_score(y, pred))
    assert overall["precision"] == pytest.approx(accuracy_score(y, pred))
    assert unitscope_mcc(cm) == pytest.approx(matthews_corrcoef(y, pred))
    assert overall["support"] == 360 and overall["correct"] == int((pred == y).sum())
    per = table[table["class"] >= 0]
    recall = recall_score(y, pred, labels=list(range(10)), average=None, zero_division=float("nan"))
    precision = precision_score(y, pred, labels=list(range(10)), average=None, zero_division=float("nan"))
    assert per["recall"].to_numpy() == pytest.approx(recall, nan_ok=True)
    assert per["precision"].to_numpy() == pytest.approx(precision, nan_ok=True)
    assert per["name"].tolist() == [str(i) for i in range(10)]
    assert torch.equal(confusion_from_table(confusion_table(cm)), cm)
    assert type(plot_confusion(cm)).__name__ == "Figure"


def test_perfect_and_known_confusion():
    # a "model" that outputs the label as one-hot, except class 2 which it calls 0
    x = torch.tensor([0, 1, 2, 2, 1, 0, 2]).float()[:, None]
    data = ArrayDataset(x, x[:, 0].long(), classes=["a", "b", "c"])
    lookup = torch.tensor([[1.0, 0, 0], [0, 1, 0], [1, 0, 0]])

    class Fixed(nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return lookup[t[:, 0].long()]

    table, cm = evaluate_classifier(Fixed(), data, batch_size=3, device="cpu")
    assert cm.tolist() == [[2, 0, 0], [0, 2, 0], [3, 0, 0]]
    assert table["name"].tolist() == ["a", "b", "c", "all"]
    assert table["recall"].iloc[-1] == pytest.approx(4 / 7)
    assert table["precision"].iloc[0] == pytest.approx(2 / 5)


def test_image_folder(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for cls, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        for i in range(3):
            noise = torch.randint(0, 30, (3,), generator=g).tolist()
            Image.new("RGB", (12, 10), tuple(max(0, c - n) for c, n in zip(colour, noise))).save(
                tmp_path / cls / f"{i}.png")
    data = unitscope.load_dataset("image-folder", "test", root=str(tmp_path), size=8)

    class RedVsBlue(nn.Module):  # class 0 = blue, 1 = red (sorted folder names)
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return torch.stack([t[:, 2].mean((1, 2)), t[:, 0].mean((1, 2))], 1)

    table, cm = evaluate_classifier(RedVsBlue(), data, device="cpu")
    assert cm.tolist() == [[3, 0], [0, 3]]
    assert table["name"].tolist() == ["blue", "red", "all"]
    assert table["recall"].iloc[-1] == 1.0


def test_bad_input():
    model = unitscope.load_model("digits-cnn")
    x = torch.rand(4, 1, 8, 8)
    with pytest.raises(ValueError, match="label 12 is outside 0..9"):
        evaluate_classifier(model, ArrayDataset(x, torch.tensor([0, 1, 12, 3])), device="cpu")
    with pytest.raises(ValueError, match="no labels"):
        evaluate_classifier(model, torch.utils.data.TensorDataset(x), device="cpu")
    class Dicts(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> dict:
            return {"x": x[i], "y": torch.tensor(i % 2)}

    _, cm = evaluate_classifier(model, Dicts(), device="cpu")
    assert int(cm.sum()) == 4 and cm.shape == (10, 10)
    with pytest.raises(ValueError, match="empty"):
        evaluate_classifier(model, ArrayDataset(x[:0], torch.zeros(0, dtype=torch.int64)), device="cpu")


def test_evaluate_experiment_and_report(tmp_path):
    from unitscope.experiments import run_config
    from unitscope.report import write_report

    config = tmp_path / "ev.toml"
    config.write_text('experiment = "evaluate"\nmodel = "digits-cnn"\ndataset = "digits"\n')
    [(target, _)] = run_config(config, out=tmp_path / "runs", progress=False)
    run = unitscope.load_run(target)
    assert run.table("evaluation")["support"].iloc[-1] == 360
    assert run.table("evaluation_confusion")["count"].sum() == 360
    page = write_report(target).read_text()
    assert "id='evaluation'" in page and "alt='evaluation figure'" in page


def test_demo_part_on_shapes(tmp_path):
    from unitscope.demo import DemoContext
    from unitscope.families.portraits import demo

    torch.manual_seed(0)
    model = unitscope.load_model("shapes-cnn").eval()
    data = unitscope.load_dataset("shapes", "test", n=60)
    run = unitscope.analyze(model, data, layers="relu1", progress=False)
    ctx = DemoContext(name="shapes-cnn", model=model, dataset="shapes", train_data=None, test_data=data,
                      run=run, out=tmp_path, quick=True, progress=False)
    demo(ctx)
    assert {"evaluation", "evaluation_confusion", "topk", "receptive_field_empirical",
            "receptive_field_empirical_layers"} <= set(run.tables)
    assert len(run.arrays["topk_mosaics"]) == 4
    assert run.tables["receptive_field_empirical"]["layer"].tolist() == ["relu2"] * 2 + ["relu3"] * 2
