"""Shared helpers of the command line."""
import sys


def fail(message: str) -> int:
    """Prints an error naming what is wrong and returns exit status 2."""
    print(f"moe-ext: error: {message}", file=sys.stderr)
    return 2
