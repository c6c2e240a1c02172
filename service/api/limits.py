"""Size limits a request must keep besides the body size: features per model and per feature
map, segments per sequence and per request (settings ``NME_MAX_*``; a 422 names the field and
the setting). They run first in their handlers, before anything looks at the values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from service.api.schemas import ModelCreate
from service.config import Settings
from service.errors import InvalidInput, invalid


def check_model_size(body: ModelCreate, settings: Settings) -> None:
    """A model defines at most ``NME_MAX_FEATURES`` features."""
    if len(body.features) > settings.max_features:
        raise InvalidInput(
            [
                invalid(
                    ["body", "features"],
                    f"{len(body.features)} features; at most {settings.max_features} are "
                    "allowed (NME_MAX_FEATURES)",
                    "too_long",
                )
            ]
        )


def check_feature_maps(
    maps: Sequence[dict[str, Any]], locs: Sequence[list[str | int]], settings: Settings
) -> None:
    """Each feature map has at most ``NME_MAX_FEATURES`` entries (the first offender is named)."""
    for features, loc in zip(maps, locs, strict=True):
        if len(features) > settings.max_features:
            raise InvalidInput(
                [
                    invalid(
                        loc,
                        f"{len(features)} features; a feature map has at most "
                        f"{settings.max_features} (NME_MAX_FEATURES)",
                        "too_long",
                    )
                ]
            )


def check_items(items: Sequence[Any], settings: Settings) -> None:
    """Predict and observation batches: the feature map of every item."""
    check_feature_maps(
        [item.features for item in items],
        [["body", "items", i, "features"] for i in range(len(items))],
        settings,
    )


def check_sequences(
    sequences: Sequence[Sequence[Any]], locs: Sequence[list[str | int]], settings: Settings
) -> None:
    """At most ``NME_MAX_SEGMENTS`` segments per sequence and ``NME_MAX_SEGMENTS_PER_REQUEST``
    in all of a request's sequences; then every segment's feature map."""
    total = 0
    for segments, loc in zip(sequences, locs, strict=True):
        if len(segments) > settings.max_segments:
            raise InvalidInput(
                [
                    invalid(
                        loc,
                        f"{len(segments)} segments; a sequence has at most "
                        f"{settings.max_segments} (NME_MAX_SEGMENTS)",
                        "too_long",
                    )
                ]
            )
        total += len(segments)
    if total > settings.max_segments_per_request:
        raise InvalidInput(
            [
                invalid(
                    loc_of_all(locs),
                    f"{total} segments in this request; at most "
                    f"{settings.max_segments_per_request} are allowed "
                    "(NME_MAX_SEGMENTS_PER_REQUEST)",
                    "too_long",
                )
            ]
        )
    for segments, loc in zip(sequences, locs, strict=True):
        check_feature_maps(
            [segment.features for segment in segments],
            [[*loc, k, "features"] for k in range(len(segments))],
            settings,
        )


def loc_of_all(locs: Sequence[list[str | int]]) -> list[str | int]:
    """``["body", "items"]`` for a batch of sequences, ``["body", "segments"]`` for one."""
    first = locs[0] if locs else ["body", "items"]
    return first[:2] if len(first) > 2 else first
