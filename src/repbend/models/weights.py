"""A cheap integrity check of safetensors weight files (header and size, no tensor data read)."""
from __future__ import annotations

from pathlib import Path

try:
    from safetensors import SafetensorError
except ImportError:  # pragma: no cover - safetensors comes with transformers
    class SafetensorError(Exception):
        pass


def damaged_weights(folder: Path, names: tuple[str, ...] = ("*.safetensors",)) -> str | None:
    """A one-line problem if a safetensors file in ``folder`` is truncated or damaged (header and size checked,
    without reading the tensors), else None."""
    from safetensors import safe_open

    for pattern in names:
        for f in sorted(folder.glob(pattern)):
            try:
                with safe_open(str(f), framework="pt") as st:
                    keys = list(st.keys())
                    if keys:  # the last tensor's data must lie inside the file
                        st.get_slice(keys[-1])
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                return (f"The weights file {f} is damaged or truncated ({first}); copy or save that model folder "
                        f"again (a partial download or an interrupted copy leaves such a file).")
    return None
