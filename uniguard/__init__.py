"""UniGuard: a small, fast guardrail service (this package holds the command line)."""

__version__ = "0.1.0"
