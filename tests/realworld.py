"""Where the real benchmark samples are: ``shared/data/realworld`` beside the checkout.

CI clones the project next to a copy of ``shared/``, so the samples are found relative to
this file; ``HDM_REALWORLD_DATA`` points elsewhere when they live somewhere else.
"""

import os
from pathlib import Path

REALWORLD = Path(
    os.environ.get("HDM_REALWORLD_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "realworld")
)
if not REALWORLD.is_dir():
    raise RuntimeError(
        f"the real benchmark samples are not at {REALWORLD}; set HDM_REALWORLD_DATA to their folder"
    )
