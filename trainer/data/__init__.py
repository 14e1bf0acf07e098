"""Prompt data sets for RL training: loading, the built-in toy task, prompts, and a resumable order.

What the trainer needs from data is small: a list of (question, reference answer) pairs with a stable id
each, token ids of the prompts the rollout engine is fed, and an order of prompts that is deterministic
and can be resumed from a checkpoint exactly where it stopped. The modules, one job each:

- ``examples``: :class:`Example` and :class:`FieldMap`, what a row is made of.
- ``readers``: :func:`load_examples` reads files, ``datasets`` folders and ``builtin:`` specs.
- ``builtin`` and ``arithmetic``: generated data sets; :func:`toy_arith`, exact-answer arithmetic with a
  difficulty knob.
- ``prompts``: :data:`TEMPLATES`, :func:`format_prompt` and :func:`build_prompts` (token ids, long prompts
  dropped).
- ``stream``: :class:`PromptStream`, a per-epoch permutation with a resumable cursor.
- ``bad_rows``: skip-with-a-warning or stop-with-an-error, for malformed rows and prompts too long.
- ``stable_random``: random integers whose sequence survives Python upgrades.

Problems the user can fix (bad path, malformed data, a checkpoint of another data set) raise
:class:`~trainer.fsutil.UserError`; programming errors (bad argument values) raise ``ValueError``.
Recoverable data problems are reported as :class:`DataWarning` through :mod:`warnings`, so that they are
visible without logging configuration and can be turned into errors with ``-W error::trainer.data.DataWarning``.
"""

from .arithmetic import toy_arith
from .bad_rows import DataWarning
from .builtin import BUILTIN_PREFIX
from .examples import QUESTION_FALLBACKS, Example, FieldMap
from .prompts import TEMPLATES, Prompt, build_prompts, format_prompt, max_prompt_chars
from .readers import load_examples
from .stream import PromptStream, fingerprint

__all__ = [
    "BUILTIN_PREFIX",
    "QUESTION_FALLBACKS",
    "TEMPLATES",
    "DataWarning",
    "Example",
    "FieldMap",
    "Prompt",
    "PromptStream",
    "build_prompts",
    "fingerprint",
    "format_prompt",
    "load_examples",
    "max_prompt_chars",
    "toy_arith",
]
