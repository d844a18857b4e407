"""Where a model comes from: a local folder or a Hugging Face hub id. Folders are made
absolute before anything records them (an adapter's base_model_name_or_path, a reward
model's backbone), so that the record still points to the same folder when it is read
from another working directory; a path that is not a folder is reported as a missing
folder, never handed to the Hub as a "repo id" (offline, transformers retries that for
a minute before failing)."""
from __future__ import annotations

import os
import re

# a hub id: "name" or "owner/name" (letters, digits, "-", "_", "."; no "..", no leading "." or "-")
_HUB_ID = re.compile(r"(?!.*\.\.)[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.fullmatch(name)) and not name.endswith((".", "-"))


def model_source(name_or_path: str, what: str = "model") -> str:
    """`name_or_path` as it should be loaded and recorded: an existing folder as its
    absolute path, a hub id as it is; FileNotFoundError naming `what` and the folder for
    anything else (a relative or absolute path that does not exist)."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"{what}: expected a folder or a hub id, got {name_or_path!r}")
    expanded = os.path.expanduser(name_or_path)
    if os.path.isdir(expanded):
        return os.path.abspath(expanded)
    if os.path.exists(expanded):
        raise FileNotFoundError(f"{what} {name_or_path!r} is a file, not a model folder")
    if is_hub_id(name_or_path) and not name_or_path.startswith(("./", "../", "~")):
        return name_or_path
    raise FileNotFoundError(f"{what} folder {os.path.abspath(expanded)!r} does not exist "
                            f"(and {name_or_path!r} is not a hub id)")

