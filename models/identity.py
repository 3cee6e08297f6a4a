"""The identity model the dedup stage may use to keep one person's faces on one side of the split.

FaceNet (InceptionResnetV1) trained on VGGFace2, from facenet-pytorch's
GitHub release. Its embeddings only link faces for the split: they are
never written to the release. It needs weights that cannot be fetched
without GitHub, so ``dedup.identity=auto`` is on in the full profile (which
fetches its weights with ``facecap models fetch``) and off offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from facecap.settings import ConfigError

from .weights import WeightsError, file_sha256

if TYPE_CHECKING:
    from facecap.config import Config


def identity_weights_path(cfg: Config) -> Path:
    from .facenet import FACENET_VGGFACE2_FILE

    if cfg.dedup.identity_weights:
        return Path(cfg.dedup.identity_weights).expanduser()
    return Path(cfg.models.cache_dir).expanduser() / FACENET_VGGFACE2_FILE


def _identity_of(path: Path) -> str:
    return f"facenet-vggface2:{file_sha256(path)[:12]}"  # as FaceEmbedder.identity


def plan_identity(cfg: Config) -> tuple[str | None, str | None]:
    """(model identity, None) when identity grouping is on, else (None, why it is off).

    On but without its weights fails the run before any work, saying what to place where. Off, it imports
    nothing (the model's module imports torch: seconds of a run's start-up).
    """
    mode = cfg.dedup.identity
    if mode == "off":
        return None, "dedup.identity is off: the split keeps clusters and source images together, not persons"
    if mode == "auto" and cfg.profile == "offline" and not cfg.dedup.identity_weights:
        return None, ("offline profile: no FaceNet VGGFace2 weights configured (dedup.identity_weights); one "
                      "person's different photos may land on both sides of the split")
    path = identity_weights_path(cfg)
    if path.is_dir():
        raise ConfigError(f"dedup.identity_weights={str(path)!r} is a directory; it must be the .pt state dict file")
    if not cfg.dedup.identity_weights:
        # The catalog's file: verified in models.cache_dir, fetched first where the profile downloads.
        from .catalog import CATALOG, FACENET_KEY, ensure_cached

        path, _ = ensure_cached(CATALOG[FACENET_KEY], cfg)
    if not path.is_file():
        from .facenet import FACENET_VGGFACE2_URL

        raise WeightsError(
            f"FaceNet VGGFace2 weights (dedup.identity={mode}) not found at {path} (dedup.identity_weights). On a "
            f"connected host run `facecap models fetch --profile full` (or download {FACENET_VGGFACE2_URL}) and "
            f"place the file at {path}; or set dedup.identity=off, or run with --profile offline.")
    return _identity_of(path), None


def load_identity_model(cfg: Config):
    """The FaceEmbedder the plan chose (same file: the worker checks the identity against the plan)."""
    from .facenet import FaceEmbedder

    device = cfg.dedup.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return FaceEmbedder(identity_weights_path(cfg), device=device)
