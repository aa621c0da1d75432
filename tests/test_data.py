"""Datasets by name: generated shapes, image folders, torchvision data from a local root."""

from __future__ import annotations

import colorsys
import math
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr

import unitscope
from unitscope.data import DATASETS, DatasetError, DatasetNotFoundError, ShapesDataset, dataset_fingerprint
from unitscope.data.shapes import SHAPE_NAMES, hsv_to_rgb, render_shapes

# ---------------------------------------------------------------- shapes


@pytest.fixture(scope="module")
def shapes_test():
    return unitscope.load_dataset("shapes", "test", n=400)


def test_shapes_are_deterministic_per_seed_and_split(shapes_test):
    again = unitscope.load_dataset("shapes", "test", n=400)
    assert torch.equal(again.pixels, shapes_test.pixels) and torch.equal(again.factors, shapes_test.factors)
    assert again.fingerprint() == shapes_test.fingerprint() == dataset_fingerprint(shapes_test)
    # a shorter draw is a prefix of a longer one: n does not change the images already drawn
    prefix = unitscope.load_dataset("shapes", "test", n=50)
    assert torch.equal(prefix.pixels, shapes_test.pixels[:50])
    train = unitscope.load_dataset("shapes", "train", n=50)
    other_seed = unitscope.load_dataset("shapes", "test", n=50, seed=1)
    for other in (train, other_seed):
        assert not torch.equal(other.factors, prefix.factors) and not torch.equal(other.pixels, prefix.pixels)
        assert other.fingerprint() != prefix.fingerprint()
    assert [len(unitscope.load_dataset("shapes", s)) for s in ("train", "test")] == [4000, 1000]


def test_shapes_items_and_attributes(shapes_test):
    image, label, factors = shapes_test[7]
    assert image.dtype == torch.float32 and image.shape == (3, 64, 64) == shapes_test.input_shape
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert label.dtype == torch.int64 and factors.dtype == torch.float32 and factors.shape == (7,)
    assert int(label) == int(factors[0]) and torch.equal(factors, shapes_test.factors[7])
    assert shapes_test.name == "shapes/test"
    assert shapes_test.classes == ["circle", "square", "triangle", "star"]
    assert ShapesDataset.factor_names == ("class", "hue", "size", "x", "y", "rotation", "background")
    assert torch.equal(shapes_test.factor("hue"), shapes_test.factors[:, 1])
    with pytest.raises(DatasetError, match="unknown factor 'colour'; known factors: class, hue"):
        shapes_test.factor("colour")
    batch = next(iter(torch.utils.data.DataLoader(shapes_test, batch_size=5)))
    assert [tuple(t.shape) for t in batch] == [(5, 3, 64, 64), (5,), (5, 7)]
    small = unitscope.load_dataset("shapes", "train", n=3, size=32)
    assert small[0][0].shape == (3, 32, 32) and small.pixels.dtype == torch.uint8


def test_shape_factors_lie_in_their_ranges_and_classes_are_balanced():
    f = unitscope.load_dataset("shapes", "train").factors  # 4,000 rows; nothing is rendered
    cls, hue, size, x, y, rot, bg = f.T
    assert set(cls.tolist()) == {0.0, 1.0, 2.0, 3.0}
    counts = torch.bincount(cls.long(), minlength=4)
    assert counts.min() >= 900 and counts.max() <= 1100, counts
    assert 0 <= hue.min() and hue.max() < 1 and 0.15 <= size.min() and size.max() <= 0.35
    assert (x >= size).all() and (x <= 1 - size).all() and (y >= size).all() and (y <= 1 - size).all()
    assert 0 <= rot.min() and rot.max() < 2 * math.pi and 0 <= bg.min() and bg.max() <= 0.5
    # uniform draws: every quarter of each range is used about equally
    for values, lo, hi in ((hue, 0, 1), (size, 0.15, 0.35), (rot, 0, 2 * math.pi), (bg, 0, 0.5)):
        quarters = torch.bincount(((values - lo) / (hi - lo) * 4).long().clamp(max=3), minlength=4)
        assert quarters.min() >= 900, quarters


def test_hsv_to_rgb_matches_colorsys():
    hues = torch.linspace(0, 0.999, 37, dtype=torch.float64)
    ours = hsv_to_rgb(hues)
    ref = torch.tensor([colorsys.hsv_to_rgb(float(h), 1.0, 1.0) for h in hues], dtype=torch.float64)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


def test_pixels_show_the_shape_colour_at_its_centre_and_the_background_in_the_corners(shapes_test):
    f, img = shapes_test.factors, shapes_test.images()
    n, side = len(f), shapes_test.size
    cols = (f[:, 3] * side).long()
    rows = (f[:, 4] * side).long()
    centre = img[torch.arange(n), :, rows, cols]  # (N, 3)
    ref = torch.tensor([colorsys.hsv_to_rgb(float(h), 1.0, 1.0) for h in f[:, 1]], dtype=torch.float32)
    torch.testing.assert_close(centre, ref, rtol=0, atol=0.5 / 255 + 1e-6)
    corners = img[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]  # (N, 3, 4)
    grey = f[:, 6].view(n, 1, 1).expand_as(corners)
    torch.testing.assert_close(corners, grey, rtol=0, atol=0.5 / 255 + 1e-6)


def test_bigger_size_factor_covers_more_pixels(shapes_test):
    f, img = shapes_test.factors, shapes_test.images()
    colour = hsv_to_rgb(f[:, 1]).view(-1, 3, 1, 1)
    bg = f[:, 6].view(-1, 1, 1, 1)
    # a pixel belongs to the shape when it is closer to the shape's colour than to the background
    shape_px = ((img - bg).abs().sum(1) > (img - colour).abs().sum(1)).flatten(1).sum(1).float()
    for k in range(4):
        mine = f[:, 0] == k
        rho = spearmanr(f[mine, 2], shape_px[mine]).statistic
        assert rho > 0.97, (SHAPE_NAMES[k], rho)
    # the areas match the geometry: a circle of radius r covers π r², a square of circumradius r 2 r², ...
    radius_px = f[:, 2] * shapes_test.size
    star = 5 * 0.45 * math.sin(math.pi / 5)  # five kites between tips at r and inner corners at 0.45 r
    for k, area in ((0, math.pi), (1, 2.0), (2, 3 * math.sqrt(3) / 4), (3, star)):
        mine = f[:, 0] == k
        ratio = shape_px[mine] / (area * radius_px[mine] ** 2)
        assert (ratio - 1).abs().max() < 0.1, (SHAPE_NAMES[k], ratio.min(), ratio.max())


def _one(cls: int, rotation: float, size: float = 0.3) -> list[float]:
    return [cls, 0.6, size, 0.5, 0.5, rotation, 0.25]


def test_rotation_turns_a_square_but_not_a_circle():
    f = torch.tensor([_one(1, 0.0), _one(1, math.pi / 4), _one(0, 0.0), _one(0, 1.3),
                      _one(1, math.pi / 2), _one(2, 0.0), _one(2, 2 * math.pi / 3),
                      _one(3, 0.0), _one(3, 2 * math.pi / 5), _one(3, math.pi / 5)])
    threads = torch.get_num_threads()
    img = render_shapes(f)
    assert torch.get_num_threads() == threads, "rendering must restore torch's thread count"
    diff = (img[0] - img[1]).abs().amax(0)
    assert int((diff > 0.5).sum()) > 100, "a square turned by 45° must change many pixels"
    assert float((img[2] - img[3]).abs().max()) < 1e-4, "a turned circle must stay the same"
    # each shape looks the same after a turn by its symmetry angle (up to float error in the edge ramp)
    for a, b in ((0, 4), (5, 6), (7, 8)):
        assert float((img[a] - img[b]).abs().max()) < 1e-3, (a, b)
    assert int(((img[7] - img[9]).abs().amax(0) > 0.5).sum()) > 50, "a star turned by 36° points down"


def test_antialias_off_gives_two_colours_and_on_blends_the_outline():
    f = torch.tensor([_one(2, 0.4)])
    hard, soft = render_shapes(f, antialias=False), render_shapes(f, antialias=True)
    assert len(torch.unique(hard[0].flatten(1), dim=1).T) == 2
    assert len(torch.unique(soft[0].flatten(1), dim=1).T) > 10
    assert float((hard - soft).abs().amax(1).gt(0.5).float().mean()) < 0.02


def test_shape_errors_name_the_fix():
    with pytest.raises(DatasetError, match=r"factors must be a tensor \(N, 7\) with columns class, hue.*"
                                           r"got \(3, 6\)"):
        ShapesDataset(torch.zeros(3, 6))
    with pytest.raises(DatasetError, match=r"factor 'class' of row 1 is 4.0; use an integer 0 to 3 \(circle"):
        ShapesDataset(torch.tensor([_one(0, 0.0), _one(4, 0.0)]))
    with pytest.raises(DatasetError, match=r"must be finite and every 'size' \(column 2\) positive"):
        ShapesDataset(torch.tensor([_one(0, 0.0, size=0.0)]))
    with pytest.raises(DatasetError, match="size .* must be an integer >= 8, got 4"):
        unitscope.load_dataset("shapes", "test", n=2, size=4)
    with pytest.raises(DatasetError, match="n must be a non-negative integer, got -1"):
        unitscope.load_dataset("shapes", "test", n=-1)
    with pytest.raises(ValueError, match="unknown split 'val'"):
        unitscope.load_dataset("shapes", "val")


# ---------------------------------------------------------------- image folders

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _write_folder(root, classes=(("cat", RED), ("dog", BLUE))):
    for name, colour in classes:
        (root / name).mkdir(parents=True)
        for j, wh in enumerate(((40, 30), (20, 50), (64, 64))):
            Image.new("RGB", wh, colour).save(root / name / f"{j}.png")
    return root


def test_image_folder_loads_resizes_and_labels(tmp_path):
    root = _write_folder(tmp_path / "pets")
    Image.new("L", (30, 30), 255).convert("L").save(root / "dog" / "3_grey.PNG")  # any mode, any case
    (root / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    (root / "dog" / "notes.txt").write_text("not an image")
    data = unitscope.load_dataset("image-folder", "train", root=root, size=16)
    assert data.classes == ["cat", "dog"] and len(data) == 7 and data.name == "image-folder/train"
    assert data.input_shape == (3, 16, 16)
    labels = [int(data[i][1]) for i in range(len(data))]
    assert labels == [0, 0, 0, 1, 1, 1, 1]
    for i in range(len(data)):
        image, label = data[i]
        assert type(image) is torch.Tensor and image.dtype == torch.float32 and image.shape == (3, 16, 16)
        assert label.dtype == torch.int64
        expected = {0: (1.0, 0.0, 0.0), 1: (0.0, 0.0, 1.0)}[int(label)] if i != 6 else (1.0, 1.0, 1.0)
        torch.testing.assert_close(image.mean((1, 2)), torch.tensor(expected), rtol=0, atol=1e-6)
    norm = unitscope.load_dataset("image-folder", "test", root=root, size=8, normalize="imagenet")
    torch.testing.assert_close(norm[0][0][:, 0, 0], torch.tensor([(1 - 0.485) / 0.229, -0.456 / 0.224,
                                                                  -0.406 / 0.225]))
    with pytest.raises(DatasetError, match="normalize must be 'imagenet' or None, got 'cifar'"):
        unitscope.load_dataset("image-folder", "test", root=root, normalize="cifar")


def test_image_folder_scales_16_bit_and_float_grey_images_by_their_range(tmp_path):
    from unitscope.data.registry import DatasetError

    (tmp_path / "a").mkdir()
    grey = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)  # 0..252
    Image.fromarray(grey).save(tmp_path / "a" / "8bit.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "a" / "16bit.png")  # the same, 16-bit
    Image.fromarray(grey.astype(np.float32) / 255).save(tmp_path / "a" / "float.tif")
    Image.fromarray(grey.astype(np.int32)).save(tmp_path / "a" / "int32.tif")  # 8-bit values, mode I
    data = unitscope.load_dataset("image-folder", "test", root=tmp_path, size=8)
    by_name = {Path(p).name: data[i][0] for i, (p, _) in enumerate(data.samples)}
    for name in ("16bit.png", "float.tif", "int32.tif"):  # PIL's RGB made the 16-bit one almost white
        torch.testing.assert_close(by_name[name], by_name["8bit.png"], atol=1e-6, rtol=0)
    from unitscope.data.folders import load_image

    Image.fromarray(grey.astype(np.uint16)).save(tmp_path / "dark16.tif")  # a 16-bit TIFF of small values
    torch.testing.assert_close(load_image(str(tmp_path / "dark16.tif"))[0],
                               torch.from_numpy(grey / 65535.0).float())  # its depth, not its maximum
    Image.fromarray(grey.astype(np.float32) * 10).save(tmp_path / "a" / "wide.tif")
    wide = unitscope.load_dataset("image-folder", "test", root=tmp_path, size=8)
    index = [Path(p).name for p, _ in wide.samples].index("wide.tif")
    with pytest.raises(DatasetError, match=r"wide.tif is a F image with values in \[0, 2520\]"):
        wide[index]


def test_image_folder_fingerprint_follows_the_files_not_the_location(tmp_path):
    root = _write_folder(tmp_path / "a")
    fp = unitscope.load_dataset("image-folder", "test", root=root, size=8).fingerprint()
    shutil.copytree(root, tmp_path / "b", copy_function=shutil.copy2)  # same names, sizes and mtimes
    assert unitscope.load_dataset("image-folder", "test", root=tmp_path / "b", size=8).fingerprint() == fp
    assert unitscope.load_dataset("image-folder", "test", root=root, size=12).fingerprint() != fp
    Image.new("RGB", (9, 9), RED).save(root / "cat" / "extra.png")
    assert unitscope.load_dataset("image-folder", "test", root=root, size=8).fingerprint() != fp


def test_image_folder_split_subfolders(tmp_path):
    _write_folder(tmp_path / "train")
    _write_folder(tmp_path / "test", classes=(("cat", RED), ("dog", BLUE), ("eel", RED)))
    train = unitscope.load_dataset("image-folder", "train", root=tmp_path, size=8)
    test = unitscope.load_dataset("image-folder", "test", root=tmp_path, size=8)
    assert (len(train), len(test), test.classes) == (6, 9, ["cat", "dog", "eel"])
    shutil.rmtree(tmp_path / "test")
    with pytest.raises(DatasetError, match=r"has train/ but no test/ folder; add .*test/<class>/<image>"):
        unitscope.load_dataset("image-folder", "test", root=tmp_path)


def test_image_folder_errors_name_the_path_and_the_layout(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError,
                       match=r"root .*nowhere does not exist; expected .*nowhere/<class>"):
        unitscope.load_dataset("image-folder", "test", root=missing)
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError, and a ValueError
        unitscope.load_dataset("image-folder", "test", root=missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty contains no class subfolders with images "
                                           r"\(accepted extensions: .jpg, .jpeg, .png"):
        unitscope.load_dataset("image-folder", "test", root=tmp_path / "empty")
    (tmp_path / "texts" / "a").mkdir(parents=True)
    (tmp_path / "texts" / "a" / "x.txt").write_text("no image")
    with pytest.raises(DatasetError, match=r"texts has class subfolders without images .*accepted extension"):
        unitscope.load_dataset("image-folder", "test", root=tmp_path / "texts")
    with pytest.raises(DatasetError, match="image-folder: pass root="):
        unitscope.load_dataset("image-folder", "test")
    root = _write_folder(tmp_path / "broken")
    (root / "cat" / "0.png").write_bytes(b"not a png")
    data = unitscope.load_dataset("image-folder", "test", root=root, size=8)
    with pytest.raises(DatasetError, match=r"cannot read image .*cat/0.png"):
        data[0]


# ---------------------------------------------------------------- torchvision data from a local root

TV_NAMES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100"}


def test_all_dataset_names_are_registered():
    assert DATASETS.names() == sorted(["digits", "shapes", "image-folder", *TV_NAMES])


@pytest.mark.parametrize("name", list(TV_NAMES))
def test_torchvision_data_is_never_downloaded(tmp_path, name):
    cls = TV_NAMES[name]
    fix = rf"unitscope never downloads: download it yourself with torchvision.datasets.{cls}\(root, " \
          rf"download=True\) on a machine with network, then pass root="
    with pytest.raises(DatasetNotFoundError, match=rf"{name}: root .*nowhere does not exist; {fix}"):
        unitscope.load_dataset(name, "test", root=tmp_path / "nowhere")
    with pytest.raises(DatasetNotFoundError, match=rf"no complete {cls} data under root .*{fix}"):
        unitscope.load_dataset(name, "train", root=tmp_path)
    assert list(tmp_path.iterdir()) == [], "nothing may be written under root"
    with pytest.raises(DatasetError, match=rf"{name}: pass root=.*{fix}"):
        unitscope.load_dataset(name, "test")


def _write_idx(path, array: np.ndarray) -> None:
    """An MNIST idx file: magic 0x08 (uint8) and the number of dimensions, big-endian sizes, the bytes."""
    path.write_bytes(struct.pack(f">I{array.ndim}I", 0x800 + array.ndim, *array.shape) + array.tobytes())


@pytest.mark.parametrize(("name", "folder", "first_class"),
                         [("mnist", "MNIST", "0 - zero"), ("fashion-mnist", "FashionMNIST", "T-shirt/top")])
def test_mnist_like_data_from_a_local_copy(tmp_path, name, folder, first_class):
    rng = np.random.default_rng(0)
    raw = tmp_path / "data" / folder / "raw"
    raw.mkdir(parents=True)
    arrays = {}
    for prefix, n in (("train", 5), ("t10k", 3)):
        arrays[prefix] = (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                          rng.integers(0, 10, n, dtype=np.uint8))
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", arrays[prefix][0])
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", arrays[prefix][1])
    test = unitscope.load_dataset(name, "test", root=tmp_path / "data")
    assert len(test) == 3 and test.input_shape == (1, 28, 28) and test.name == f"{name}/test"
    assert test.classes[0] == first_class and len(test.classes) == 10
    image, label = test[2]
    assert image.dtype == torch.float32 and image.shape == (1, 28, 28) and label.dtype == torch.int64
    torch.testing.assert_close(image[0], torch.from_numpy(arrays["t10k"][0][2]).float() / 255)
    assert [int(test[i][1]) for i in range(3)] == arrays["t10k"][1].tolist()
    assert len(unitscope.load_dataset(name, "train", root=tmp_path / "data")) == 5
    # the inner folder works as root too, and the fingerprint does not depend on where the files are
    inner = unitscope.load_dataset(name, "test", root=tmp_path / "data" / folder)
    assert inner.fingerprint() == test.fingerprint() == dataset_fingerprint(test)
    assert unitscope.load_dataset(name, "train", root=tmp_path / "data").fingerprint() != test.fingerprint()


def test_cifar10_from_a_local_copy_without_the_md5_check(tmp_path, monkeypatch):
    # torchvision checks the md5 sum of every CIFAR file; a fake copy passes only with that check off
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    data = np.random.default_rng(1).integers(0, 256, (4, 3 * 32 * 32), dtype=np.uint8)  # rows: R, G, B planes
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": data, "labels": [3, 1, 4, 1]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                     "ship", "truck"]}, f)
    test = unitscope.load_dataset("cifar10", "test", root=tmp_path)
    assert len(test) == 4 and test.input_shape == (3, 32, 32) and test.classes[3] == "cat"
    image, label = test[2]
    assert image.shape == (3, 32, 32) and image.is_contiguous() and int(label) == 4
    torch.testing.assert_close(image, torch.from_numpy(data[2]).view(3, 32, 32).float() / 255)
    assert test.fingerprint() == unitscope.load_dataset("cifar10", "test", root=folder).fingerprint()


def test_fingerprints_of_tensor_datasets_and_subsets_see_every_item():
    """A label changed in the middle of a TensorDataset, or a Subset of other indices, changes the
    fingerprint (the first and last items alone were hashed before)."""
    from torch.utils.data import Subset, TensorDataset

    x, y = torch.zeros(1300, 2), torch.arange(1300)
    changed = y.clone()
    changed[650] = 7
    assert dataset_fingerprint(TensorDataset(x, y)) != dataset_fingerprint(TensorDataset(x, changed))
    base = TensorDataset(x, y)
    assert dataset_fingerprint(Subset(base, range(20))) != dataset_fingerprint(Subset(base, [*range(19), 30]))
    assert dataset_fingerprint(Subset(base, range(20))) == dataset_fingerprint(Subset(base, range(20)))
