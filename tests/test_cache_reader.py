"""``CacheReader``: after the first step one layer per group of alike layers is read, and the
derived readings equal full readings; a divergence is caught at the end, never silent."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from tracer.cache_inspector import CacheReader, SharedReadings, expand, read_cache

from conftest import make_tiny_llama


def _cache(layers=4, seq=5):
    model = make_tiny_llama()
    cache = DynamicCache(config=model.config)
    for i in range(layers if layers <= 2 else 2):
        cache.update(torch.zeros(1, 2, seq, 16), torch.zeros(1, 2, seq, 16), i)
    return cache


def _fields(rows):
    return [(int(r.seen), int(r.kept), r.allocated, r.nbytes) for r in expand(rows)]


def test_groups_alike_layers_and_matches_full_reads():
    cache = _cache(2)
    reader = CacheReader()
    first = reader.read(cache)
    assert isinstance(first, list)  # the first step reads every layer
    for step in range(3):
        for i in range(2):
            cache.update(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16), i)
        got = reader.read(cache)
        assert isinstance(got, SharedReadings) and len(got.reps) == 1  # both layers alike: one read
        assert _fields(got) == _fields(read_cache(cache))
    assert reader.check(cache, got) is None


def test_divergence_is_reported():
    cache = _cache(2)
    reader = CacheReader()
    reader.read(cache)
    cache.update(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16), 0)
    cache.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), 1)  # layer 1 grows differently
    got = reader.read(cache)
    note = reader.check(cache, got)
    assert note is not None and note.startswith("cache layer 1:")


def test_new_cache_object_is_read_in_full():
    reader = CacheReader()
    reader.read(_cache(2))
    assert isinstance(reader.read(_cache(2, seq=7)), list)
