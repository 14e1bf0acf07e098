"""What happens to a bad row (malformed, or a prompt too long): ``on_bad_row="skip"`` drops it with one
:class:`DataWarning` that counts the dropped rows and quotes the first few; ``"error"`` stops at the first
one with a :class:`~trainer.fsutil.UserError` naming its location."""

from __future__ import annotations

import warnings

from ..fsutil import UserError

ON_BAD_ROW = ("skip", "error")
SHOWN_BAD_ROWS = 5  # locations quoted in the skip warning; the rest are only counted
SKIP_BAD_HINT = "fix the data or pass on_bad_row='skip' (in a dler train config: data.on_bad_row=skip)"


class DataWarning(UserWarning):
    """Rows or prompts were dropped; training goes on without them."""


def check_on_bad_row(on_bad_row: str) -> None:
    """Raise ValueError unless ``on_bad_row`` is one of :data:`ON_BAD_ROW`."""
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {', '.join(map(repr, ON_BAD_ROW))}, got {on_bad_row!r}")


def report_bad_rows(bad: list[str], on_bad_row: str, *, total: int, path: str, hint: str | None) -> None:
    """Raise UserError for the first of the ``"where: problem"`` messages ``bad`` (``on_bad_row="error"``), or
    warn once about all of them; ``hint`` says what to do instead (default: :data:`SKIP_BAD_HINT`).
    The warning points at the caller of the function that calls this one (``load_examples``).
    """
    if not bad:
        return
    if on_bad_row == "error":
        more = f" (and {len(bad) - 1} more bad rows)" if len(bad) > 1 else ""
        raise UserError(f"{bad[0]}{more}; {hint or SKIP_BAD_HINT}")
    shown = "; ".join(bad[:SHOWN_BAD_ROWS])
    more = f"; and {len(bad) - SHOWN_BAD_ROWS} more" if len(bad) > SHOWN_BAD_ROWS else ""
    warnings.warn(f"skipped {len(bad)} of {total} rows of {path}: {shown}{more}", DataWarning, stacklevel=3)
