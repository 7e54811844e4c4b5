"""Training from the cache equals training live: same pixels, ground truth and outputs."""

from __future__ import annotations

import pickle

import pytest
import torch

from frozenseg.cache import CachedTrainingSet, CacheError, collate_cached, write_cache
from frozenseg.data import CocoInstances
from frozenseg.data.transforms import scale_flip
from frozenseg.detector.output import append_queries, batch_outputs
from tests import test_cache
from tests.test_cache import MAX_SIZE

pytestmark = pytest.mark.slow  # pytest -m "not slow" leaves this module out

# The cache tests' fixtures: their synthetic data, its train split, the tiny detector.
data, dataset, detector = test_cache.data, test_cache.dataset, test_cache.detector
VIEWS = scale_flip(scales=(48, 64, 80), max_size=MAX_SIZE)


@pytest.fixture(scope="module")
def cache_dir(detector, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "c"
    write_cache(detector, dataset, out, dtype="fp32", shard_size=4, views=3, seed=5,
                transform=VIEWS)
    return out


def test_an_item_equals_the_live_detector_on_its_view(detector, dataset, cache_dir):
    train = CachedTrainingSet(cache_dir, dataset, seed=0)
    assert len(train) == len(dataset)
    for i in (0, 3):
        image, target, cached = train[i]
        assert target["image_id"] == cached.image_id and target["view"] == cached.view
        assert tuple(image.shape[-2:]) == tuple(cached.image_size.tolist())
        live, gt = detector.detect_and_embed([image], [target["boxes"]], [target["labels"]])
        torch.testing.assert_close(cached.memory, live.memory[0], rtol=0, atol=0)
        torch.testing.assert_close(cached.queries, live.queries[0], rtol=0, atol=0)
        torch.testing.assert_close(cached.gt_queries, gt.queries[0], rtol=0, atol=0)


def test_views_change_with_the_epoch_and_are_seeded(dataset, cache_dir):
    train = CachedTrainingSet(cache_dir, dataset, seed=0)

    def views(epoch):
        train.set_epoch(epoch)
        return [train[i][2].view_index for i in range(len(train))]

    first = views(0)
    assert views(0) == first and any(views(e) != first for e in (1, 2, 3))
    assert len({v for e in range(6) for v in views(e)}) == 3
    clone = pickle.loads(pickle.dumps(train))  # what a DataLoader worker gets
    assert [clone[i][2].view_index for i in range(len(clone))] == views(5)


def test_collated_batch_equals_a_live_padded_batch_per_image(detector, dataset, cache_dir):
    """Each image of a cached batch holds exactly its single-image live outputs, padded."""
    train = CachedTrainingSet(cache_dir, dataset)
    items = [train[i] for i in (1, 2, 5)]
    batch = collate_cached(items)
    d, g = batch.detections, batch.ground_truth
    for b, (image, target, _) in enumerate(items):
        live, gt = detector.detect_and_embed([image], [target["boxes"]], [target["labels"]])
        for level, (h, w) in enumerate(live.spatial_shapes.tolist()):
            hp, wp = d.spatial_shapes[level].tolist()
            start, own = int(d.level_start_index[level]), int(live.level_start_index[level])
            padded = d.memory[b, start : start + hp * wp].view(hp, wp, -1)
            mask = d.memory_mask[b, start : start + hp * wp].view(hp, wp)
            alone = live.memory[0, own : own + h * w].view(h, w, -1)
            torch.testing.assert_close(padded[:h, :w], alone, rtol=0, atol=0)
            assert not mask[:h, :w].any() and mask.sum() == hp * wp - h * w
            torch.testing.assert_close(d.valid_ratios[b, level],
                                       torch.tensor([w / wp, h / hp]), rtol=0, atol=1e-7)
        n = len(target["boxes"])
        torch.testing.assert_close(g.queries[b, :n], gt.queries[0], rtol=0, atol=0)
        torch.testing.assert_close(g.boxes[b, :n], gt.boxes[0], rtol=0, atol=1e-6)
        assert g.query_mask[b].sum() == n and torch.equal(g.labels[b, :n], target["labels"])
        assert batch.images[b, :, : image.shape[1], : image.shape[2]].equal(image)
    assert d.c1.shape[1:] == (0, 0, 0)  # recomputed by training: FrozenDetector.stage1


def test_batch_outputs_matches_the_detector_on_a_padded_batch_of_equal_sizes(detector):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 96, generator=g) for _ in range(2)]
    together = detector(images)
    joined = batch_outputs([detector([image]) for image in images])
    # A batch of two sums in another order than two singles (fp32): differences of a few
    # 1e-5 on values of order 1 are rounding, a wrong join would be off by far more.
    for name in ("memory", "queries", "boxes", "valid_ratios", "c1"):
        torch.testing.assert_close(getattr(joined, name), getattr(together, name),
                                   atol=1e-4, rtol=1e-5)
    assert torch.equal(joined.spatial_shapes, together.spatial_shapes)


def test_append_queries_puts_the_extra_ones_after(detector):
    images = [torch.rand(3, 64, 96)]
    found, boxed = detector.detect_and_embed(images, [torch.tensor([[2.0, 3.0, 40.0, 50.0]])])
    both = append_queries(found, boxed)
    assert both.queries.shape[1] == found.queries.shape[1] + 1
    torch.testing.assert_close(both.queries[:, -1], boxed.queries[:, 0], rtol=0, atol=0)
    assert both.memory is found.memory


def test_a_cache_of_another_dataset_is_refused(data, cache_dir):
    val = CocoInstances(data / "images" / "val", data / "instances_val.json")
    with pytest.raises(CacheError, match="instances_train.json.*instances_val.json"):
        CachedTrainingSet(cache_dir, val)
