"""`KfuseError`, the one user-facing error type (JAX-free, so configs and the CLI's flag
parsing can raise and catch it without importing JAX)."""

__all__ = ["KfuseError"]


class KfuseError(ValueError):
  """A user-facing error: one line that names the file / key / shape at fault."""
