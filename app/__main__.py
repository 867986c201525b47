"""``python -m app``: start the Gradio app (same as ``hub app``)."""

from __future__ import annotations

import sys

from app.ui import main

if __name__ == "__main__":
    sys.exit(main())
