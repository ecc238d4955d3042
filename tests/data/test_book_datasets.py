"""The book's datasets by name (``job/data/book_datasets.py``): one URL and sha256 each, which the settings'
defaults and the downloader's check both read."""

from __future__ import annotations

import hashlib

from job.config import DataConfig, DPOConfig, RunConfig
from job.data.book_datasets import DATASETS, known_dataset
from job.data.instructions import dataset_file


def test_each_known_sha256_is_the_one_of_the_books_file(shared_data):
    """Against the book's own files (the checkout's reference copies of what its repository serves)."""
    files = {"instructions": "instruction-data.json", "preferences": "instruction-data-with-preference.json"}
    assert set(DATASETS) == set(files)
    for name, file in files.items():
        assert DATASETS[name].sha256 == hashlib.sha256((shared_data / file).read_bytes()).hexdigest()


def test_every_default_dataset_is_downloaded_with_its_sha256_and_its_way_in():
    """A default that drifted from the registry's URL would be fetched unchecked: here it fails."""
    defaults = {
        "--data FILE": [DataConfig().data, RunConfig().data],
        "--dpo-data FILE": [DPOConfig().data, RunConfig().dpo_data],
    }
    for way_in, urls in defaults.items():
        for url in urls:
            remote = dataset_file(url)
            assert remote.sha256 == known_dataset(url).sha256 and remote.way_in == way_in, url
    assert dataset_file().sha256 == DATASETS["instructions"].sha256


def test_a_url_of_the_users_has_no_known_sha256_and_a_mirror_keeps_the_known_one():
    near = DATASETS["instructions"].url.replace("/main/", "/master/")
    assert known_dataset(near) is None and dataset_file(near).sha256 is None
    assert known_dataset(DATASETS["preferences"].url.upper()) is None  # URLs compare exactly
    mirrored = dataset_file(DATASETS["preferences"].url, base_url="s3://bucket/cache/")
    assert mirrored.urls == ("s3://bucket/cache/instruction-data-with-preference.json",)
    assert mirrored.sha256 == DATASETS["preferences"].sha256
