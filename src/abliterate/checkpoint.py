"""Where the editable matrices live in a model's safetensors files.

A parameter of the loaded model is one tensor of the checkpoint or, for fused experts stored
expert by expert, one tensor per expert. `locate` finds those parts by name. Both sides are then
seen in the layout every edit works on, (..., hidden, in): `parameter_part` for the part of the
parameter one checkpoint tensor holds, `checkpoint_part` for that checkpoint tensor. The disk reset
copies the second into the first; the merged export edits the second before writing it out.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from abliterate.components import Matrix
from abliterate.errors import UserError

_LAYER_PART = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.(.*)$")


def safetensors_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def key_files(folder: Path) -> dict[str, Path]:
    """Every tensor name of the checkpoint and the file that holds it."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: folder / file for key, file in weight_map.items()}
    from safetensors import safe_open

    mapping = {}
    for file in safetensors_files(folder):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            mapping.update(dict.fromkeys(handle.keys(), file))
    return mapping


def locate(matrix: Matrix, files: dict[str, Path]) -> list[tuple[Path, str]]:
    """Where a parameter lives in the checkpoint: one key, or one key per expert for fused experts.

    Checkpoint names may differ from the loaded model's in their prefix (multimodal wrappers) and,
    for fused experts, be stored expert by expert (`experts.N.down_proj.weight` or `experts.N.w2.weight`).
    """
    if matrix.name in files:
        return [(files[matrix.name], matrix.name)]
    match = _LAYER_PART.search(matrix.name)
    if match is None:
        raise UserError(f"cannot find {matrix.name} in the model's safetensors files")
    layer, rest = match.groups()
    suffix = re.compile(rf"(?:^|\.)(?:layers|h|blocks)\.{layer}\.{re.escape(rest)}$")
    same = [key for key in files if suffix.search(key)]
    if len(same) == 1:
        return [(files[same[0]], same[0])]
    if rest.endswith("experts.down_proj"):
        container = re.escape(rest[: -len("experts.down_proj")])
        container_names = rf"(?:{container}|block_sparse_moe\.)" if container == "mlp\\." else container
        per_expert = re.compile(
            rf"(?:^|\.)(?:layers|h|blocks)\.{layer}\.{container_names}experts\.(\d+)\.(?:down_proj|w2)\.weight$"
        )
        experts = sorted(
            ((int(found.group(1)), key) for key in files if (found := per_expert.search(key))),
            key=lambda item: item[0],
        )
        if len(experts) == matrix.parameter.shape[0]:
            return [(files[key], key) for _, key in experts]
    raise UserError(f"cannot find {matrix.name} in the model's safetensors files")


def parameter_part(matrix: Matrix, position: int, parts: int) -> torch.Tensor:
    """The part of the parameter that checkpoint tensor `position` of `parts` holds, as (..., hidden, in)."""
    view = matrix.view()
    return view if parts == 1 else view[position]


def checkpoint_part(matrix: Matrix, parts: int, tensor: torch.Tensor) -> torch.Tensor:
    """A checkpoint tensor of this matrix as (..., hidden, in), sharing its storage.

    A whole parameter is stored in the parameter's own layout; one expert of a fused stack is
    stored as a Linear weight, (out, in), whatever the stack's layout.
    """
    return tensor.movedim(matrix.out_axis, -2) if parts == 1 else tensor
