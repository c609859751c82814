"""Write docs/configuration.md from the config dataclasses' field help (``--check``: fail if it is out of date)."""

import sys
from pathlib import Path

from llm_cxr.train.config import config_reference

PATH = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"

if __name__ == "__main__":
    text = config_reference() + "\n"
    if "--check" in sys.argv:
        if not PATH.exists() or PATH.read_text() != text:
            sys.exit(f"{PATH} is out of date: run python scripts/config_reference.py")
    else:
        PATH.parent.mkdir(exist_ok=True)
        PATH.write_text(text)
        print(PATH)
