"""The feature cache: the frozen detector run once over a dataset, stored for training.

``CachedTrainingSet(cache, dataset)`` + ``collate_cached`` feed training from it;
``write_cache(detector, dataset, out_dir, ...)`` writes it (see
:mod:`frozenseg.cache.writer`); ``FeatureCache(out_dir)`` reads it (see
:mod:`frozenseg.cache.store` for the format); ``verify_cache(out_dir)`` names bad shards.
"""

from frozenseg.cache.store import CachedImage, CacheError, FeatureCache, verify_cache
from frozenseg.cache.training import CachedTrainingSet, TrainingBatch, collate_cached
from frozenseg.cache.writer import write_cache

__all__ = ["CacheError", "CachedImage", "CachedTrainingSet", "FeatureCache", "TrainingBatch",
           "collate_cached", "verify_cache", "write_cache"]
