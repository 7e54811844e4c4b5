"""The feature cache: the frozen detector run once over a dataset, stored for training.

``CachedTrainingSet(cache, dataset)`` + ``collate_cached`` feed training from it;
``write_cache(detector, dataset, out_dir, ...)`` writes it (see
:mod:`frozenseg.cache.writer`; ``write_cache(**recipe_cache_job(recipe))`` what a recipe
trains on); ``FeatureCache(out_dir)`` reads it (see :mod:`frozenseg.cache.store` for the
format); ``verify_cache(out_dir)`` names bad shards.
"""

from frozenseg.cache.store import CachedImage, CacheError, FeatureCache, verify_cache
from frozenseg.cache.training import CachedTrainingSet, TrainingBatch, collate_cached
from frozenseg.cache.writer import recipe_cache_job, write_cache

__all__ = ["CacheError", "CachedImage", "CachedTrainingSet", "FeatureCache", "TrainingBatch",
           "collate_cached", "recipe_cache_job", "verify_cache", "write_cache"]
