"""VTAB-1K loader: layout, eager validation errors, image decoding, group means."""

from __future__ import annotations

import re

import pytest
import torch
from PIL import Image

from lily_ssm.data.vtab import (
    GROUPS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    NUM_CLASSES,
    SPLITS,
    TASKS,
    VTabDataset,
    group_means,
    load_image,
    write_fake_vtab,
)


def test_task_table():
    assert len(TASKS) == 19
    assert NUM_CLASSES["sun397"] == 397 and NUM_CLASSES["patch_camelyon"] == 2
    assert NUM_CLASSES["smallnorb_azi"] == 18 and NUM_CLASSES["clevr_count"] == 8
    assert [len(GROUPS[g]) for g in ("Natural", "Specialized", "Structured")] == [7, 4, 8]
    assert sorted(t for ts in GROUPS.values() for t in ts) == sorted(TASKS)


def test_fake_layout_loads(tmp_path):
    task_dir = write_fake_vtab(tmp_path, "eurosat", classes=3, per_class=2, image_size=20)
    assert task_dir == tmp_path / "eurosat"
    for split in SPLITS:
        assert (task_dir / f"{split}.txt").is_file()
    ds = VTabDataset(tmp_path, "eurosat", "train800val200", image_size=16)
    assert len(ds) == 3 * 2 * 2 and ds.num_classes == 10
    assert sorted(ds.labels) == sorted([0, 1, 2] * 4)
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert isinstance(y, int) and y == ds.labels[0]
    assert len(VTabDataset(tmp_path, "eurosat", "test", image_size=16)) == 6
    # works with a DataLoader (default collate)
    xb, yb = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert xb.shape == (4, 3, 16, 16) and yb.dtype == torch.int64


def test_classes_are_distinguishable(tmp_path):
    write_fake_vtab(tmp_path, "svhn", classes=4, per_class=3, image_size=16)
    ds = VTabDataset(tmp_path, "svhn", "train800", image_size=16)
    means = {}
    for x, y in ds:
        means.setdefault(y, []).append(x.mean(dim=(1, 2)))
    centroids = torch.stack([torch.stack(means[c]).mean(0) for c in range(4)])
    # every pair of class mean colours differs noticeably
    d = torch.cdist(centroids, centroids)
    assert (d + torch.eye(4) * 1e3).min() > 0.2


def test_normalisation_and_resize(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("L", (7, 5), color=255).save(path)  # greyscale, non-square -> RGB, square
    x = load_image(path, image_size=9)
    assert x.shape == (3, 9, 9)
    expected = (1.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x.mean(dim=(1, 2)), expected, atol=1e-4, rtol=0)
    y = load_image(path, image_size=9, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    torch.testing.assert_close(y, torch.ones_like(y), atol=1e-4, rtol=0)


def test_configurable_mean_std(tmp_path):
    write_fake_vtab(tmp_path, "dtd", classes=2, per_class=1, image_size=8)
    a = VTabDataset(tmp_path, "dtd", "test", image_size=8)[0][0]
    b = VTabDataset(tmp_path, "dtd", "test", image_size=8, mean=(0.0,) * 3, std=(1.0,) * 3)[0][0]
    assert 0.0 <= b.min() and b.max() <= 1.0
    torch.testing.assert_close(a, (b - torch.tensor(IMAGENET_MEAN).view(3, 1, 1))
                               / torch.tensor(IMAGENET_STD).view(3, 1, 1))


def test_unknown_task(tmp_path):
    with pytest.raises(ValueError, match="unknown VTAB-1K task 'imagenet'.*caltech101.*clevr_count"):
        VTabDataset(tmp_path, "imagenet", "test")
    with pytest.raises(ValueError, match="unknown VTAB-1K split"):
        VTabDataset(tmp_path, "cifar", "train")


def test_missing_list_file(tmp_path):
    task_dir = write_fake_vtab(tmp_path, "cifar", classes=2, per_class=1, image_size=8)
    (task_dir / "val200.txt").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(task_dir / "val200.txt"))):
        VTabDataset(tmp_path, "cifar", "val200")


@pytest.mark.parametrize("bad", ["images/only_a_path.png", "images/x.png two", "images/x.png 1.5"])
def test_malformed_line(tmp_path, bad):
    task_dir = write_fake_vtab(tmp_path, "kitti", classes=2, per_class=1, image_size=8)
    list_path = task_dir / "test.txt"
    lines = list_path.read_text().splitlines()
    lines.insert(1, bad)
    list_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{list_path}:2: malformed line")):
        VTabDataset(tmp_path, "kitti", "test")


@pytest.mark.parametrize("label", [4, -1])
def test_label_out_of_range(tmp_path, label):
    task_dir = write_fake_vtab(tmp_path, "kitti", classes=2, per_class=1, image_size=8)  # kitti: 4 classes
    list_path = task_dir / "train800.txt"
    first = list_path.read_text().splitlines()[0].rsplit(maxsplit=1)[0]
    with list_path.open("a") as f:
        f.write(f"{first} {label}\n")
    with pytest.raises(ValueError) as info:
        VTabDataset(tmp_path, "kitti", "train800")
    msg = str(info.value)
    assert f"{list_path}:3:" in msg and f"label {label}" in msg and "0..3" in msg


def test_missing_image(tmp_path):
    task_dir = write_fake_vtab(tmp_path, "dmlab", classes=2, per_class=1, image_size=8)
    rel = (task_dir / "test.txt").read_text().splitlines()[1].rsplit(maxsplit=1)[0]
    (task_dir / rel).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(task_dir / rel))):
        VTabDataset(tmp_path, "dmlab", "test")


def test_corrupt_image_fails_on_load(tmp_path):
    task_dir = write_fake_vtab(tmp_path, "resisc45", classes=2, per_class=1, image_size=8)
    ds = VTabDataset(tmp_path, "resisc45", "test", image_size=8)
    bad_path, _ = ds.samples[0]
    bad_path.write_bytes(b"this is not a png")
    ds[1]  # others still load
    with pytest.raises(OSError, match=re.escape(f"cannot read image {bad_path}")):
        ds[0]
    assert str(bad_path).startswith(str(task_dir))


def test_paths_with_spaces_and_blank_lines(tmp_path):
    task_dir = tmp_path / "clevr_dist"
    (task_dir / "my images").mkdir(parents=True)
    Image.new("RGB", (4, 4), (255, 0, 0)).save(task_dir / "my images" / "a b.png")
    (task_dir / "test.txt").write_text("my images/a b.png 5\n\n")
    ds = VTabDataset(tmp_path, "clevr_dist", "test", image_size=4)
    assert len(ds) == 1 and ds[0][1] == 5


def test_write_fake_vtab_rejects_too_many_classes(tmp_path):
    with pytest.raises(ValueError, match="classes must be in 1..2"):
        write_fake_vtab(tmp_path, "patch_camelyon", classes=3)


def test_group_means():
    acc = {t: 0.0 for t in TASKS}
    for t in GROUPS["Natural"]:
        acc[t] = 70.0
    for t in GROUPS["Specialized"]:
        acc[t] = 80.0
    for t in GROUPS["Structured"]:
        acc[t] = 50.0
    acc["cifar"] = 77.0  # natural mean becomes 71.0
    out = group_means(acc)
    assert out["Natural"] == pytest.approx(71.0)
    assert out["Specialized"] == pytest.approx(80.0)
    assert out["Structured"] == pytest.approx(50.0)
    assert out["mean_of_groups"] == pytest.approx((71.0 + 80.0 + 50.0) / 3)
    assert out["mean_all_tasks"] == pytest.approx((7 * 71.0 + 4 * 80.0 + 8 * 50.0) / 19)


def test_group_means_partial_and_unknown():
    out = group_means({"cifar": 0.5, "dtd": 0.7, "eurosat": 0.9})
    assert out == pytest.approx({"Natural": 0.6, "Specialized": 0.9, "mean_all_tasks": 0.7})
    assert "Structured" not in out and "mean_of_groups" not in out
    assert group_means({}) == {}
    with pytest.raises(ValueError, match="unknown VTAB-1K task 'mnist'"):
        group_means({"mnist": 1.0})
