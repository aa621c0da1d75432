"""Units on the last axis (token maps, channels-last blocks) are read as units, not positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.convnext import CNBlock
from torchvision.models.vision_transformer import VisionTransformer

import unitscope
from unitscope.analyses.masking import masked
from unitscope.data import ArrayDataset
from unitscope.units import UnitLayout

D, T, HIDDEN = 12, 4, 20  # distinct sizes, so an axis mix-up cannot pass by coincidence


class TinyViT(nn.Module):
    """Patches by a convolution, tokens by a functional transpose, then token-wise layers."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, D, 4, 4)  # 8×8 images: 2×2 = T patches
        self.drop = nn.Dropout(0.0)
        self.block = nn.TransformerEncoderLayer(D, 2, 16, dropout=0.0, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(D, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, D))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.drop(self.patch(x).flatten(2).transpose(1, 2))
        t = self.block(t)
        t = t + self.mlp(t)
        return self.head(self.norm(t).mean(1))


def _raw(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    box = {}
    handle = dict(model.named_modules())[name].register_forward_hook(
        lambda m, a, o: box.update(o=(o if torch.is_tensor(o) else o[0]).detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return box["o"]


@pytest.fixture(scope="module")
def vit() -> TinyViT:
    torch.manual_seed(0)
    return TinyViT().eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_layout_of_a_token_model(vit, images):
    layout = UnitLayout(vit)
    axes = {name: layout.axis(name, _raw(vit, name, images))
            for name in ("patch", "drop", "block", "block.linear1", "mlp.0", "mlp.1", "norm", "head")}
    # the dropout after the functional transpose follows the conv's count (12), found on the last axis
    assert axes == {"patch": 1, "drop": 2, "block": 2, "block.linear1": 2, "mlp.0": 2, "mlp.1": 2,
                    "norm": 2, "head": 1}


def test_capture_reductions_take_units_from_the_last_axis(vit, images):
    raw = _raw(vit, "mlp.1", images)  # (N, T, HIDDEN)
    for reduce, want in (("mean", raw.mean(1)), ("max", raw.amax(1)),
                         ("channelwise", raw.reshape(-1, HIDDEN)), ("none", raw.transpose(1, 2))):
        with unitscope.capture(vit, "mlp.1", reduce=reduce) as acts, torch.no_grad():
            vit(images)
        torch.testing.assert_close(acts["mlp.1"], want, rtol=0, atol=0)


def test_saturation_of_a_token_layer_is_over_its_units(vit, images):
    data = ArrayDataset(images, torch.zeros(len(images), dtype=torch.int64))
    run = unitscope.analyze(vit, data, layers=["mlp.0", "mlp.1"], analyses=[unitscope.Saturation()],
                            batch_size=4, progress=False, device="cpu")
    table = run.table("saturation").set_index("layer")
    assert table.loc["mlp.1", "width"] == HIDDEN and table.loc["mlp.1", "samples"] == len(images) * T
    rows = _raw(vit, "mlp.1", images).reshape(-1, HIDDEN).double().numpy()
    cov = run.analysis("saturation").accumulators["mlp.1"].compute(ddof=0).cov.numpy()
    # float32 activations of another forward: equal to a few ulps (the H100 machine's CPU differed
    # by 1e-8 on entries of 1e-2 between analyze's forward and a plain one of the same batch)
    np.testing.assert_allclose(cov, np.cov(rows, rowvar=False, bias=True), rtol=1e-5,
                               atol=1e-5 * np.abs(cov).max())


def test_masking_a_token_unit_zeroes_that_unit_on_every_token(vit, images):
    before = _raw(vit, "mlp.0", images)
    with masked(vit, {"mlp.0": [3]}):
        after = _raw(vit, "mlp.0", images)
    assert (after[..., 3] == 0).all() and (before[..., 3] != 0).all()
    keep = [u for u in range(HIDDEN) if u != 3]
    torch.testing.assert_close(after[..., keep], before[..., keep], rtol=0, atol=0)


def test_projection_of_a_token_layer_at_delta_one_keeps_the_accuracy(vit, images):
    y = torch.arange(len(images)) % 3
    data = ArrayDataset(images, y)
    table = unitscope.projected_accuracy(vit, data, data, layers=["mlp.0"], deltas=[1.0], device="cpu")
    assert table["test_acc"].iloc[1] == table["test_acc"].iloc[0]
    assert table["sum_width"].iloc[1] == HIDDEN


def test_channels_last_block_inside_and_channel_first_outside():
    torch.manual_seed(0)
    c = 6
    net = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), CNBlock(c, 1e-6, 0.0), nn.ReLU()).eval()
    x = torch.rand(2, 3, 5, 5)
    layout = UnitLayout(net)
    assert [layout.axis(n, _raw(net, n, x)) for n in ("1.block.2", "1.block.4", "1", "2")] == [3, 3, 1, 1]
    gelu = _raw(net, "1.block.4", x)  # (N, H, W, 4c)
    with unitscope.capture(net, "1.block.4", reduce="mean") as acts, torch.no_grad():
        net(x)
    torch.testing.assert_close(acts["1.block.4"], gelu.mean((1, 2)), rtol=0, atol=0)


def test_torchvision_vision_transformer_layers():
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=10,
                            mlp_dim=14, num_classes=3).eval()
    x = torch.rand(2, 3, 16, 16)
    layout = UnitLayout(vit)
    names = ["conv_proj", "encoder.dropout", "encoder.layers.encoder_layer_0.mlp.1", "encoder.ln"]
    assert [layout.axis(n, _raw(vit, n, x)) for n in names] == [1, 2, 2, 2]
    run = unitscope.analyze(vit, ArrayDataset(x, torch.zeros(2, dtype=torch.int64)), layers=names[1:],
                            progress=False, device="cpu")
    widths = run.table("moments").groupby("layer").size().to_dict()
    assert widths == {"encoder.dropout": 10, "encoder.layers.encoder_layer_0.mlp.1": 14, "encoder.ln": 10}


def test_feature_visualisation_objective_reads_a_token_unit(vit, images):
    from unitscope.visualize import _ObjectiveHooks, _parse_targets

    targets = _parse_targets(vit, ["mlp.1:5", "mlp.1:17"], "channel")  # units 5, 17 > T - 1
    with torch.no_grad(), _ObjectiveHooks(vit, targets, "channel") as hooks:
        got = hooks.run(images[:2])
    raw = _raw(vit, "mlp.1", images[:2])
    torch.testing.assert_close(got, torch.stack([raw[0, :, 5].mean(), raw[1, :, 17].mean()]))


def test_unit_relevance_of_a_token_layer_sums_over_tokens():
    from unitscope.analyses.importance import unit_relevance

    torch.manual_seed(0)

    class TokenMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch = nn.Conv2d(3, D, 4, 4)
            self.fc = nn.Linear(D, HIDDEN)
            self.act = nn.ReLU()
            self.head = nn.Linear(HIDDEN, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.act(self.fc(self.patch(x).flatten(2).transpose(1, 2))).mean(1))

    model = TokenMLP().eval()
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.arange(5) % 3
    rel = unit_relevance(model, ArrayDataset(x, y), ["act"], train_filter="all", batch_size=5)
    want = unitscope.attribute(model, x, y, method="lrp", layer="act").double()  # (N, T, HIDDEN)
    assert rel.total["act"].shape == (HIDDEN,)
    torch.testing.assert_close(rel.total["act"], want.sum((0, 1)))


def test_layer_info_counts_the_units_of_token_layers(vit):
    from unitscope.models.info import layer_info

    info = layer_info(vit, (3, 8, 8)).set_index("name")
    assert info.loc["patch", "channels"] == D and info.loc["mlp.1", "channels"] == HIDDEN
    assert info.loc["mlp.1", "output_shape"] == f"({T}, {HIDDEN})"


class SharedReluCNN(nn.Module):
    """One ReLU after convolutions of two widths, an activation and dropout defined after the head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1)
        self.relu = nn.ReLU()  # defined after conv2 (32 wide), first called after conv1 (16 wide)
        self.fc = nn.Linear(32, 10)
        self.act, self.drop = nn.GELU(), nn.Dropout(0.0)  # defined after fc, used on conv maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.conv1(x)))
        x = self.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def test_modules_defined_out_of_order_keep_convolution_units():
    """A 32-wide map (32×32) after a ReLU defined after a 32-channel conv; a GELU defined after
    Linear(32, 10): definition order alone gave the width axis for both."""
    net = SharedReluCNN().eval()
    x = torch.rand(2, 3, 32, 32)
    with unitscope.capture(net, ["act", "drop", "relu"], reduce="mean") as acts, torch.no_grad():
        net(x)
    assert {k: tuple(v.shape) for k, v in acts.items()} == {"act": (2, 16), "drop": (2, 16), "relu": (2, 32)}


def test_layernorm2d_recurrent_and_square_token_layers():
    from torchvision.models.convnext import LayerNorm2d

    torch.manual_seed(0)
    ln = nn.Sequential(nn.Conv2d(3, 6, 3), LayerNorm2d(6), nn.GELU()).eval()  # channels-first norm
    with unitscope.capture(ln, ["1", "2"], reduce="mean") as acts, torch.no_grad():
        ln(torch.rand(2, 3, 9, 9))
    assert {k: v.shape[1] for k, v in acts.items()} == {"1": 6, "2": 6}

    class CRNN(nn.Module):  # conv columns as time steps, then an LSTM
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3, padding=1)
            self.rnn = nn.LSTM(8 * 6, 24, batch_first=True, bidirectional=True)
            self.drop = nn.Dropout()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seq = self.conv(x).flatten(1, 2).transpose(1, 2)  # (N, W, C·H)
            return self.drop(self.rnn(seq)[0])

    crnn = CRNN().eval()
    with unitscope.capture(crnn, ["rnn", "drop"], reduce="mean") as acts, torch.no_grad():
        crnn(torch.rand(2, 1, 6, 25))
    assert {k: v.shape[1] for k, v in acts.items()} == {"rnn": 48, "drop": 48}

    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=1, hidden_dim=17,
                            mlp_dim=8, num_classes=3).eval()  # 16 patches + class token: 17 × 17
    x = torch.rand(2, 3, 32, 32)
    with unitscope.capture(vit, "encoder.dropout") as acts, torch.no_grad():
        vit(x)
    torch.testing.assert_close(acts["encoder.dropout"], _raw(vit, "encoder.dropout", x).transpose(1, 2))


def test_swin_v2_attention_that_calls_its_weights_functionally():
    """torchvision's Swin V2 attention runs only its position-bias MLP (3 units) as modules."""
    from torchvision.models import swin_v2_t

    torch.manual_seed(0)
    swin = swin_v2_t().eval()
    x = torch.rand(1, 3, 64, 64)
    name = "features.1.0.attn"
    with unitscope.capture(swin, name, reduce="mean", calls="first") as acts, torch.no_grad():
        swin(x)
    torch.testing.assert_close(acts[name], _raw(swin, name, x).mean((1, 2)))


def test_watching_leaves_a_transformer_layer_on_its_fused_path():
    """torch runs a TransformerEncoderLayer fused only when none of its modules has a hook."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True).eval()
    net = nn.Sequential(nn.Linear(8, 16), layer, nn.GELU())
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        ref = net(x)
    with unitscope.capture(net, "2") as acts, torch.no_grad():  # a follower: layouts are watched
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in layer.modules())
        out = net(x)
    assert torch.equal(out, ref) and acts["2"].shape == (2, 16, 5)


def test_functional_permute_to_channels_last_reads_the_last_axis():
    class ToChannelsLast(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.permute(0, 2, 3, 1)

    net = nn.Sequential(nn.Conv2d(3, 8, 3), ToChannelsLast(), nn.GELU()).eval()
    x = torch.rand(2, 3, 12, 12)
    with unitscope.capture(net, ["1", "2"], reduce="mean") as acts, torch.no_grad():
        net(x)
    assert {k: v.shape[1] for k, v in acts.items()} == {"1": 8, "2": 8}


def test_interrupted_training_leaves_no_tracker_hooks():
    from unitscope.train import Callback, train

    class Stop(Callback):
        def on_batch_end(self, state) -> None:
            raise KeyboardInterrupt

    torch.manual_seed(0)
    model = unitscope.load_model("digits-cnn")
    tracker = unitscope.SaturationTracker(model, ["relu1", "conv2"])  # a follower: layouts are watched
    global_hooks = dict(nn.modules.module._global_forward_hooks)
    with pytest.raises(KeyboardInterrupt):
        train(model, unitscope.load_dataset("digits", "train"), epochs=1, callbacks=[tracker, Stop()],
              device="cpu")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert dict(nn.modules.module._global_forward_hooks) == global_hooks


def test_functional_ops_that_change_the_channels_keep_dim_one():
    """A width equal to the conv's channel count must not pass for the units after a cat (CReLU),
    a GLU or a pixel shuffle: only a rearrangement of the conv's values (a permute) may move them."""
    class CReLU(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x, -x], 1)

    x = torch.rand(2, 3, 18, 18)
    cases = {"crelu": (nn.Sequential(nn.Conv2d(3, 16, 3), CReLU(), nn.ReLU()), 32),
             "glu": (nn.Sequential(nn.Conv2d(3, 16, 3), nn.GLU(dim=1), nn.ReLU()), 8),
             "shuffle": (nn.Sequential(nn.Conv2d(3, 16, 3, stride=2), nn.PixelShuffle(2), nn.ReLU()), 4)}
    for name, (net, units) in cases.items():  # every map is 16 wide
        with unitscope.capture(net.eval(), "2", reduce="mean") as acts, torch.no_grad():
            net(x)
        assert acts["2"].shape[1] == units, name


def test_sequence_first_layers_keep_one_row_per_input():
    """batch_first=False attention gives (T, N, D): rows are inputs, not tokens."""
    class SeqFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(6, D)
            self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, 2, 16, dropout=0.0), 1,
                                                 enable_nested_tensor=False)
            self.head = nn.Linear(D, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, T, 6)
            return self.head(self.encoder(self.embed(x).transpose(0, 1)).mean(0))

    torch.manual_seed(0)
    net = SeqFirst().eval()
    x = torch.randn(5, 7, 6)
    layers = ["encoder.layers.0", "encoder.layers.0.self_attn"]  # they say batch_first=False
    with unitscope.capture(net, layers, reduce="mean") as acts, torch.no_grad():
        net(x)
    for name in layers:
        torch.testing.assert_close(acts[name], _raw(net, name, x).mean(0), rtol=0, atol=0)  # (N, units)
    run = unitscope.analyze(net, ArrayDataset(x, torch.zeros(5, dtype=torch.int64)), layers=layers,
                            progress=False, device="cpu")
    assert (run.table("moments").groupby("layer")["count"].first() == 5).all()


def test_sequence_first_comes_from_batch_first_not_from_sizes():
    """A GRU with batch_first=False inside a model of (N, T, F) inputs: rows are inputs also when
    N == T, and a batch_first=True encoder on a (T, N, F) input is not flipped by sizes. (The
    dropout after the GRU is read batch-first: only the modules that say batch_first are.)"""
    class SeqGRU(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.drop = nn.GRU(6, 8), nn.Dropout(0.0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.drop(self.rnn(x.transpose(0, 1))[0]).mean(0)

    torch.manual_seed(0)
    net = SeqGRU().eval()
    for n in (5, 7):  # 7: as many inputs as time steps
        x = torch.randn(n, 7, 6)
        with unitscope.capture(net, "rnn", reduce="mean") as acts, torch.no_grad():
            net(x)
        torch.testing.assert_close(acts["rnn"], _raw(net, "rnn", x).mean(0), rtol=0, atol=0)

    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    x = torch.randn(7, 5, 8)  # the encoder's own (N=7, T=5) view
    with unitscope.capture(layer, "linear2", reduce="mean") as acts, torch.no_grad():
        layer(x)
    torch.testing.assert_close(acts["linear2"], _raw(layer, "linear2", x).mean(1), rtol=0, atol=0)


def test_unit_relevance_refuses_a_layer_whose_rows_are_not_inputs():
    from unitscope.analyses.importance import unit_relevance

    class SeqLinear(nn.Module):  # a Linear on (T, N, D) after a functional transpose
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.head = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.lin(x.transpose(0, 1)).sum(0))

    torch.manual_seed(0)
    x = torch.randn(10, 4, 6)
    with pytest.raises(ValueError, match="4 rows for 10 inputs"):
        unit_relevance(SeqLinear().eval(), ArrayDataset(x, torch.arange(10) % 3), ["lin"], train_filter="all",
                       batch_size=10)
