"""Typed errors; each message names the file and says how to fix the problem."""


class EdgeError(Exception):
    """Base class of every error kdq-edge raises on purpose."""


class ManifestError(EdgeError):
    """The model folder has no usable manifest.json (missing, unreadable, or from an unsupported export)."""


class IntegrityError(EdgeError):
    """A model artifact is missing or its sha256 differs from the manifest (tampered or corrupted)."""


class ImageError(EdgeError):
    """An image cannot be decoded, or its mode cannot be converted without guessing."""


class UncertifiedError(EdgeError):
    """The export's certificate did not pass (rejected, not proven, or never run): refused unless allowed."""
