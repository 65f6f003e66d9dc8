"""Progress bars and messages, one switch for both: the ``patcher`` logger's level.

The CLI sets it (``-v`` / ``-q``); a library caller sets it with `logging`. Bars are shown when the
logger would show INFO messages, so ``-q`` silences both and a library user who configured nothing
sees neither, without a ``progress`` flag threaded through every call.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

LOGGER = logging.getLogger("patcher")


def showing() -> bool:
    """Whether progress is shown: the ``patcher`` logger is enabled for INFO."""
    return LOGGER.isEnabledFor(logging.INFO)


def bar(iterable: Iterable[T] | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar over ``iterable`` (or a manual one), shown only when `showing`."""
    return tqdm(iterable, disable=not showing(), **kwargs)
