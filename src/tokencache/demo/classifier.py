"""A small CNN digit classifier on 16x16 images in [-1, 1]; its penultimate layer feeds the Fréchet distance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["DigitClassifier", "load_classifier_from", "save_classifier"]

CLASSIFIER_WEIGHTS = "classifier.safetensors"
CLASSIFIER_CONFIG = "classifier.json"


class DigitClassifier(nn.Module):
    """conv(1->c1) -> pool -> conv(c1->c2) -> pool -> linear(hidden) [features] -> linear(num_classes).

    Input: float images ``(N, 1, 16, 16)`` in [-1, 1]. ``features(x)`` returns the ``hidden``-wide
    penultimate activations (after ReLU), ``forward(x)`` the class logits.
    """

    def __init__(self, channels: tuple[int, int] = (32, 64), hidden: int = 128, num_classes: int = 10,
                 image_size: int = 16) -> None:
        super().__init__()
        c1, c2 = channels
        self.config: dict[str, Any] = {
            "channels": [c1, c2], "hidden": hidden, "num_classes": num_classes, "image_size": image_size,
        }
        self.conv = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(c2 * (image_size // 4) ** 2, hidden)
        self.dropout = nn.Dropout(0.25)
        self.head = nn.Linear(hidden, num_classes)
        self.num_features = hidden

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features ``(N, hidden)``."""
        return torch.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(N, num_classes)``."""
        return self.head(self.dropout(self.features(x)))


def save_classifier(model: DigitClassifier, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``classifier.safetensors`` and ``classifier.json`` (config + ``extra``) into ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / CLASSIFIER_WEIGHTS))
    meta = {"config": model.config, **(extra or {})}
    (out / CLASSIFIER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_classifier_from(folder: str | Path, device: str | torch.device = "cpu") -> DigitClassifier:
    """Load a classifier saved by :func:`save_classifier`, in eval mode."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = json.loads((folder / CLASSIFIER_CONFIG).read_text())
    cfg = meta["config"]
    model = DigitClassifier(tuple(cfg["channels"]), cfg["hidden"], cfg["num_classes"], cfg["image_size"])
    model.load_state_dict(load_file(str(folder / CLASSIFIER_WEIGHTS)))
    return model.to(device).eval()
