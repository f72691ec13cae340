"""How long an image pull takes on a simulated host, and what the status says meanwhile.

Vast reports large images taking 5-10 minutes to pull, during which the instance is `loading` with a status
message that moves (docs/simulated-limits.md). Sizes here are compressed download sizes of the public images, in
GB; an unknown image counts as a mid-size one. Pull time is `size * PULL_S_PER_GB * scale`, so tests run it in
seconds with a small scale.
"""

from __future__ import annotations

PULL_S_PER_GB = 45.0  # about 7 minutes for a 9 GB CUDA + PyTorch image, in the range Vast states
STEPS = 10  # status message updates during one pull

# Longest prefix wins; `devel` tags carry the compilers and are about three times the runtime ones.
_SIZES: tuple[tuple[str, float], ...] = (
    ("pytorch/pytorch", 3.5),
    ("vastai/pytorch", 9.0),
    ("vastai/base-image", 4.0),
    ("nvidia/cuda", 1.5),
    ("ubuntu", 0.03),
    ("python", 0.05),
    ("busybox", 0.002),
)
DEFAULT_SIZE_GB = 2.0


def image_size_gb(image: str | None) -> float:
    if not image:
        return DEFAULT_SIZE_GB
    name = image.split("@", 1)[0]
    size = next((gb for prefix, gb in _SIZES if name.startswith(prefix)), DEFAULT_SIZE_GB)
    if "devel" in name:
        size *= 3
    elif "base" in name.rsplit(":", 1)[-1]:
        size /= 4
    return size


def pull_seconds(image: str | None, scale: float) -> float:
    return max(0.0, image_size_gb(image) * PULL_S_PER_GB * scale)


def pull_message(image: str | None, fraction: float) -> str:
    """The `loading` status message part way through a pull."""
    size = image_size_gb(image)
    done = min(1.0, max(0.0, fraction))
    return f"Pulling image {image or '(none)'}: {done * size:.1f} of {size:.1f} GB ({done:.0%})"
