"""One module per model family: its block layouts, how its transformer lays out tokens, its published
shapes and FLOP rules. Importing this package registers them all."""

from . import dit, flux, hunyuan_video, latte, opensora, qwenimage, sd3, wan  # noqa: F401
