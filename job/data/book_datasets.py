"""The book's datasets, each by name with its URL and sha256, in one place: the settings' defaults and the
downloader's check read them, so the two cannot drift apart. No imports: the settings read it."""

from __future__ import annotations

from dataclasses import dataclass

BOOK = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07"


@dataclass(frozen=True)
class KnownDataset:
    url: str
    sha256: str
    """Of the file at ``url`` as the book's repository holds it; a download that differs is refused."""
    way_in: str
    """The option that replaces its download, named when it cannot be fetched."""


DATASETS: dict[str, KnownDataset] = {
    # the book's 1,100 instruction entries (ch07/01)
    "instructions": KnownDataset(
        f"{BOOK}/01_main-chapter-code/instruction-data.json",
        "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
        "--data FILE",
    ),
    # the same entries with chosen and rejected responses, for DPO (ch07/04)
    "preferences": KnownDataset(
        f"{BOOK}/04_preference-tuning-with-dpo/instruction-data-with-preference.json",
        "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e",
        "--dpo-data FILE",
    ),
}


def known_dataset(url: str) -> KnownDataset | None:
    """The registry's dataset at ``url``, or None: a dataset of the user's, with no known sha256."""
    return next((known for known in DATASETS.values() if known.url == url), None)
