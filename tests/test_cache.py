"""The feature cache: what it stores equals the live detector, resume, verify, refusals."""

from __future__ import annotations

import json
import os

import pytest
import torch
from typer.testing import CliRunner

import frozenseg
from frozenseg.cache import CacheError, FeatureCache, write_cache
from frozenseg.cli import app
from frozenseg.data import CocoInstances, evaluation
from frozenseg.data.transforms import scale_flip
from tests.tiny import save_detector, tiny_detector

pytestmark = pytest.mark.slow  # pytest -m "not slow" leaves this module out

runner = CliRunner()
# A small evaluation resize keeps the tiny detector fast on the CPU (the default is 800/1333).
SHORT, MAX_SIZE = 64, 128
TRANSFORM = evaluation(SHORT, MAX_SIZE)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    frozenseg.synth(root, images=10, seed=0)
    return root


@pytest.fixture(scope="module")
def dataset(data):
    return CocoInstances(data / "images" / "train", data / "instances_train.json")


@pytest.fixture(scope="module")
def detector():
    return tiny_detector()


def write(det, dataset, out, **options):
    options = {"dtype": "fp16", "shard_size": 3, "transform": TRANSFORM, **options}
    return write_cache(det, dataset, out, **options)


def live(det, dataset, item):
    """The detector run now on the same view the cache stored."""
    image, target = dataset.get_view(dataset_index(dataset, item.image_id), item.view)
    assert target["image_id"] == item.image_id
    return det([image])


def dataset_index(dataset, image_id: int) -> int:
    return [im["id"] for im in dataset.images].index(image_id)


TOLERANCE = {"fp32": {"rtol": 0, "atol": 0}, "fp16": {"rtol": 1e-3, "atol": 1e-4},
             "bf16": {"rtol": 8e-3, "atol": 1e-3}}


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16", "int8"])
def test_cache_then_read_equals_live(detector, dataset, tmp_path, dtype):
    write(detector, dataset, tmp_path / "c", dtype=dtype)
    cache = FeatureCache(tmp_path / "c")
    assert len(cache) == len(dataset) == 8
    assert cache.image_ids == [im["id"] for im in dataset.images]
    for i in range(len(cache)):
        item = cache[i]
        out = live(detector, dataset, item)
        assert item.memory.dtype == item.queries.dtype == torch.float32
        for name in ("boxes", "scores", "labels", "spatial_shapes", "level_start_index"):
            torch.testing.assert_close(getattr(item, name), getattr(out, name).squeeze(0),
                                       rtol=0, atol=0)
        torch.testing.assert_close(item.valid_ratios, out.valid_ratios[0], rtol=0, atol=0)
        assert item.image_size.tolist() == out.image_sizes[0].tolist()
        assert min(item.image_size.tolist()) == SHORT or max(item.image_size.tolist()) == MAX_SIZE
        for name in ("memory", "queries"):
            cached, expected = getattr(item, name), getattr(out, name)[0]
            if dtype == "int8":  # round to nearest: at most half a step of its channel's scale
                bound = expected.abs().amax(0) / 127 / 2
                assert ((cached - expected).abs() <= bound * (1 + 1e-5) + 1e-7).all(), name
            else:
                torch.testing.assert_close(cached, expected, **TOLERANCE[dtype])


def test_to_output_is_a_batch_of_one(detector, dataset, tmp_path):
    write(detector, dataset, tmp_path / "c", dtype="fp32")
    item = FeatureCache(tmp_path / "c")[2]
    out, expected = item.to_output(), live(detector, dataset, item)
    for name in ("queries", "boxes", "memory", "valid_ratios", "image_sizes"):
        torch.testing.assert_close(getattr(out, name), getattr(expected, name))
    assert out.query_mask.all() and not out.memory_mask.any()


class Interrupt(KeyboardInterrupt):
    pass


def stop_after(shard: int):
    def hook(j: int) -> None:
        if j == shard:
            raise Interrupt

    return hook


def test_interrupted_then_resumed_equals_uninterrupted(detector, dataset, tmp_path):
    whole = write(detector, dataset, tmp_path / "whole", dtype="int8")
    part = tmp_path / "part"
    with pytest.raises(Interrupt):
        write(detector, dataset, part, dtype="int8", on_shard=stop_after(1))
    # Only complete shards, each recorded and verifying; the run is marked incomplete.
    assert sorted(p.name for p in part.iterdir()) == [
        "index.json", "shard-00000.safetensors", "shard-00001.safetensors"]
    index = json.loads((part / "index.json").read_text())
    assert not index["complete"] and len(index["shards"]) == 2
    with pytest.raises(CacheError, match="incomplete"):
        FeatureCache(part)
    # A run killed while saving the third shard leaves its temp file behind.
    (part / ".shard-00002.safetensors.tmp-12345").write_bytes(b"half a shard")
    with pytest.raises(CacheError, match="not empty; pass --resume"):
        write(detector, dataset, part, dtype="int8")
    resumed = write(detector, dataset, part, dtype="int8", resume=True)
    assert resumed == whole  # same shard list, image ids and sha256s: byte-identical shards
    assert json.loads((part / "index.json").read_text()) == whole
    assert not [p for p in part.iterdir() if p.name.startswith(".")]
    a, b = FeatureCache(tmp_path / "whole"), FeatureCache(part)
    for i in range(len(a)):
        torch.testing.assert_close(a[i].memory, b[i].memory, rtol=0, atol=0)
        torch.testing.assert_close(a[i].queries, b[i].queries, rtol=0, atol=0)


def test_resume_rewrites_a_corrupted_shard(detector, dataset, tmp_path):
    whole = write(detector, dataset, tmp_path / "c")
    flip_byte(tmp_path / "c" / "shard-00001.safetensors")
    assert FeatureCache(tmp_path / "c").verify() == ["shard-00001.safetensors"]
    calls = []
    write(detector, dataset, tmp_path / "c", resume=True, on_shard=calls.append)
    assert calls == [1]  # only the bad shard is rewritten
    assert json.loads((tmp_path / "c" / "index.json").read_text()) == whole


def flip_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_names_a_corrupted_shard(detector, dataset, tmp_path):
    out = tmp_path / "c"
    write(detector, dataset, out)
    ok = runner.invoke(app, ["cache", "--verify", str(out)])
    assert ok.exit_code == 0, ok.output
    flip_byte(out / "shard-00002.safetensors")
    bad = runner.invoke(app, ["cache", "--verify", str(out)])
    assert bad.exit_code == 1
    assert "shard-00002.safetensors" in bad.output and "sha256" in bad.output


def test_resume_refuses_another_detector(detector, dataset, tmp_path):
    write(detector, dataset, tmp_path / "c")
    other = tiny_detector(seed=1)
    with pytest.raises(CacheError, match="another recipe") as err:
        write(other, dataset, tmp_path / "c", resume=True)
    message = str(err.value)
    assert message.count("detector weights sha256") == 2 and "\n" not in message


def test_resume_refuses_another_dtype(detector, dataset, tmp_path):
    with pytest.raises(Interrupt):
        write(detector, dataset, tmp_path / "c", on_shard=stop_after(0))
    with pytest.raises(CacheError, match="dtype fp16.*dtype int8"):
        write(detector, dataset, tmp_path / "c", dtype="int8", resume=True)


def test_size_projection_refuses_over_max_gb(detector, dataset, tmp_path):
    lines = []
    with pytest.raises(CacheError, match="over --max-gb"):
        write(detector, dataset, tmp_path / "c", max_gb=1e-6, log=lines.append)
    assert not (tmp_path / "c").exists()
    assert "MB per image" in lines[0]
    index = write(detector, dataset, tmp_path / "c", max_gb=1.0)
    written = sum(p.stat().st_size for p in (tmp_path / "c").glob("shard-*"))
    # The projection counts the stored tensors; files add only headers.
    assert 0.8 < written / index["projected"]["total_bytes"] < 1.3


def test_cli_end_to_end(detector, dataset, data, tmp_path):
    folder = save_detector(detector, tmp_path / "det", source="tiny.pth")
    other = save_detector(tiny_detector(seed=1), tmp_path / "det2", source="other.pth")
    out = tmp_path / "cache"
    args = ["cache", "--images", str(data / "images" / "train"),
            "--annotations", str(data / "instances_train.json"), "--out", str(out),
            "--shard-size", "3", "--short", str(SHORT), "--max-size", str(MAX_SIZE),
            "--top-k", "7", "--memory-layer", "1", "--dtype", "int8"]
    result = runner.invoke(app, [*args, "--detector", str(folder)])
    assert result.exit_code == 0, result.output
    assert "projected size" in result.output and "cached 8 images in 3 shards" in result.output
    cache = FeatureCache(out)
    expected = live(detector, dataset, cache[5])
    torch.testing.assert_close(cache[5].boxes, expected.boxes[0], rtol=0, atol=0)
    again = runner.invoke(app, [*args, "--detector", str(folder)])
    assert again.exit_code == 1 and "--resume" in again.output
    refused = runner.invoke(app, [*args, "--detector", str(other), "--resume"])
    assert refused.exit_code == 1
    assert "tiny.pth" in refused.output and "other.pth" in refused.output
    missing = runner.invoke(app, ["cache", "--out", str(out)])
    assert missing.exit_code == 1 and "--detector" in missing.output


def test_augmented_views_are_seeded_and_each_equals_live(detector, dataset, tmp_path):
    small = scale_flip(scales=(48, 64, 80), max_size=MAX_SIZE)  # the default's sizes, scaled down
    index = write(detector, dataset, tmp_path / "c", views=3, seed=7, transform=small,
                  dtype="fp32", shard_size=5)
    cache = FeatureCache(tmp_path / "c")
    assert len(cache) == 3 * len(dataset) and cache.views_per_image == 3
    assert cache.entries == [(i, k) for i in range(len(dataset)) for k in range(3)]
    views = [cache[p].view for p in range(len(cache))]
    assert len({json.dumps(v) for v in views}) > len(dataset)  # views differ within images
    assert any(step["op"] == "hflip" for v in views for step in v["steps"])
    for p in (0, 4, 11, 23):
        item = cache[p]
        assert cache.position(item.dataset_index, item.view_index) == p
        torch.testing.assert_close(item.memory, live(detector, dataset, item).memory[0],
                                   rtol=0, atol=0)
    again = write(detector, dataset, tmp_path / "again", views=3, seed=7, transform=small,
                  dtype="fp32", shard_size=5)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in index["shards"]]
    other = write(detector, dataset, tmp_path / "other", views=3, seed=8, transform=small,
                  dtype="fp32", shard_size=5)
    assert [s["sha256"] for s in other["shards"]] != [s["sha256"] for s in index["shards"]]


def test_stored_c1_equals_the_backbone_stage(detector, dataset, tmp_path):
    write(detector, dataset, tmp_path / "c", dtype="fp32", store_c1=True)
    item = FeatureCache(tmp_path / "c")[3]
    image, _ = dataset.get_view(item.dataset_index, item.view)
    torch.testing.assert_close(item.c1, detector.stage1([image])[0], rtol=0, atol=0)
    torch.testing.assert_close(item.to_output().c1, live(detector, dataset, item).c1,
                               rtol=0, atol=0)
    write(detector, dataset, tmp_path / "q", dtype="int8", store_c1=True)
    quantised = FeatureCache(tmp_path / "q")[3].c1
    bound = item.c1.abs().flatten(1).amax(1) / 127 / 2  # half a step of each channel's scale
    assert ((quantised - item.c1).abs() <= bound[:, None, None] * (1 + 1e-5) + 1e-7).all()


def test_an_unreadable_image_is_skipped_and_named(detector, data, tmp_path):
    import shutil

    images = tmp_path / "images"
    shutil.copytree(data / "images" / "train", images)
    broken = sorted(images.iterdir())[2]
    broken.write_bytes(b"not a jpeg")
    dataset = CocoInstances(images, data / "instances_train.json")
    with pytest.warns(UserWarning, match=broken.name):
        write(detector, dataset, tmp_path / "c")
    cache = FeatureCache(tmp_path / "c")
    missing = [i for i, im in enumerate(dataset.images) if im["file_name"] == broken.name]
    assert len(cache) == len(dataset) - 1 and cache.position(missing[0], 0) is None
    assert FeatureCache(tmp_path / "c").verify() == []


def test_two_processes_write_the_same_cache_as_one(detector, dataset, data, tmp_path):
    """torchrun (what ``accelerate launch`` does on a CPU) with 2 processes, gloo."""
    import subprocess
    import sys

    folder = save_detector(detector, tmp_path / "det", source="tiny.pth")
    args = ["cache", "--detector", str(folder), "--images", str(data / "images" / "train"),
            "--annotations", str(data / "instances_train.json"), "--shard-size", "2",
            "--short", str(SHORT), "--max-size", str(MAX_SIZE), "--top-k", "7",
            "--memory-layer", "1", "--views", "2", "--dtype", "fp32"]
    one = runner.invoke(app, [*args, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
              "--standalone", "-m", "frozenseg"]
    two = subprocess.run([*launch, *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = (json.loads((tmp_path / name / "index.json").read_text()) for name in ("one", "two"))
    assert b["complete"] and [s["file"] for s in b["shards"]] == [s["file"] for s in a["shards"]]
    assert [s["entries"] for s in b["shards"]] == [s["entries"] for s in a["shards"]]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir())  # the process parts are merged away
    # Not byte-identical: torchrun runs each process on one thread, which changes the order
    # of float sums; the contents agree to rounding.
    one, two = FeatureCache(tmp_path / "one"), FeatureCache(tmp_path / "two")
    assert two.verify() == []
    for p in range(len(one)):
        assert one[p].view == two[p].view
        torch.testing.assert_close(one[p].memory, two[p].memory, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(one[p].boxes, two[p].boxes, rtol=1e-4, atol=1e-5)


def _dead_pid() -> int:
    """The pid of a process that has ended (a killed run's lock holds such a pid)."""
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_second_cache_process_on_the_folder_refuses(detector, dataset, data, tmp_path):
    """Two caches on one folder did all the work twice; the second now refuses in one line
    naming the holder's pid, and a killed run's lock (a dead pid) is taken over."""
    from frozenseg.files import LOCK_FILE, folder_lock

    folder = save_detector(detector, tmp_path / "det", source="tiny.pth")
    out = tmp_path / "c"
    args = ["cache", "--detector", str(folder), "--images", str(data / "images" / "train"),
            "--annotations", str(data / "instances_train.json"), "--out", str(out),
            "--short", str(SHORT), "--max-size", str(MAX_SIZE), "--top-k", "7",
            "--memory-layer", "1", "--resume"]
    with folder_lock(out):  # another process's lock: flock conflicts across open files
        refused = runner.invoke(app, args)
    assert refused.exit_code == 1, refused.output
    assert f"in use by process {os.getpid()}" in refused.stderr and str(out) in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    (out / LOCK_FILE).write_text(f"{_dead_pid()}\n")  # killed while caching
    taken = runner.invoke(app, args)
    assert taken.exit_code == 0, taken.output
    assert FeatureCache(out).verify() == [] and not (out / LOCK_FILE).exists()
