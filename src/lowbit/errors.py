"""The one exception type lowbit raises for bad input.

Every message names the problem and the fix, in one line, so the CLI can print it as is
and exit non-zero.
"""

from __future__ import annotations


class LowbitError(Exception):
    """Bad input or an unsupported request; the message says what is wrong and how to fix it."""
