"""What a GPU benchmark's --json file holds: the GPU's name, then the run's fields (imported by the scripts
beside this file)."""

import json

import torch


def write_result(path: str | None, fields: dict, device: torch.device | None = None, indent: int = 2) -> None:
    """Writes {"device": the name of `device` (the current GPU when None), **fields} as JSON to `path`;
    nothing when `path` is empty (no --json)."""
    if path:
        with open(path, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(device), **fields}, f, indent=indent)
