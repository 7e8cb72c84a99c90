"""Finding the matrices that write into the residual stream, layer by layer.

For every decoder layer there are two components:

- `attn`: the attention output projection (`o_proj`, `out_proj`, `dense`, `c_proj`, `wo`);
- `mlp`: the dense MLP down projection, or for MoE layers every expert's down projection
  (a ModuleList of experts, or one fused 3-D parameter) plus any shared experts.

Each matrix is described by a `Matrix`: the parameter itself and the axis of it that indexes the
residual stream (`out_axis`). Linear weights are (out, in) so `out_axis` is 0; GPT-2's Conv1D is
(in, out); fused experts are (experts, out, in), or (experts, in, out) where the experts module says
`is_transposed`. Everything downstream works on `Matrix.view()`, which puts the residual axis
second to last, so one code path edits every layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from abliterate.errors import UserError

COMPONENTS = ("attn", "mlp")

_ATTENTION_CONTAINERS = ("self_attn", "attn", "attention", "self_attention")
_ATTENTION_OUTPUTS = ("o_proj", "out_proj", "dense", "c_proj", "wo")
_MLP_CONTAINERS = ("mlp", "feed_forward", "block_sparse_moe", "moe", "ffn")
_MLP_OUTPUTS = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "w2", "wo")
_SHARED_EXPERTS = ("shared_expert", "shared_experts", "shared_mlp")


@dataclass(frozen=True)
class Matrix:
    """One matrix (or fused stack of expert matrices) that writes into the residual stream."""

    name: str  # fully qualified parameter name, as in `model.named_parameters()`
    parameter: torch.Tensor
    out_axis: int  # axis of `parameter` indexing the residual stream

    def view(self) -> torch.Tensor:
        """The parameter as (..., hidden, in): a view sharing storage, so writes reach the model."""
        return self.parameter.data.movedim(self.out_axis, -2)

    @property
    def nbytes(self) -> int:
        return self.parameter.numel() * self.parameter.element_size()


LayerComponents = dict[str, list[Matrix]]


@dataclass
class EditableModel:
    """The decoder layers of a model and the editable matrices of each."""

    layers: list[nn.Module]
    components: list[LayerComponents] = field(default_factory=list)
    hidden_size: int = 0

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def matrices(self):
        """Yield (layer index, component, position, matrix) for every editable matrix."""
        for index, layer_components in enumerate(self.components):
            for component, matrices in layer_components.items():
                for position, matrix in enumerate(matrices):
                    yield index, component, position, matrix

    @property
    def editable_bytes(self) -> int:
        return sum(matrix.nbytes for *_, matrix in self.matrices())

    def offloaded(self) -> list[str]:
        """The editable matrices accelerate keeps off the model's devices (`--device-map auto` with
        too little GPU memory places layers on the CPU or disk): they sit on the meta device and are
        read from elsewhere for every forward pass, so an edit written into them reaches nothing."""
        return [matrix.name for *_, matrix in self.matrices() if matrix.parameter.device.type == "meta"]


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder layers: the longest `layers`/`h`/`blocks` list in the model."""
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and name.split(".")[-1] in ("layers", "h", "blocks")
        and len(module) > 0
    ]
    if not candidates:
        raise UserError(
            f"cannot find the decoder layers of {type(model).__name__}: no `layers` list in the model"
        )
    return max(candidates, key=lambda item: len(item[1]))


def find_components(model: nn.Module) -> EditableModel:
    """Find every layer's editable matrices; a model with none is an error."""
    prefix, layers = find_layers(model)
    hidden_size = _hidden_size(model)
    editable = EditableModel(layers=list(layers), hidden_size=hidden_size)
    for index, layer in enumerate(layers):
        layer_prefix = f"{prefix}.{index}"
        components: LayerComponents = {"attn": [], "mlp": []}
        attention = _first_child(layer, _ATTENTION_CONTAINERS)
        if attention is not None:
            name, module = attention
            output = _first_child(module, _ATTENTION_OUTPUTS)
            if output is not None:
                components["attn"].append(
                    _linear_matrix(f"{layer_prefix}.{name}.{output[0]}", output[1], hidden_size)
                )
        mlp = _first_child(layer, _MLP_CONTAINERS)
        if mlp is not None:
            name, module = mlp
            components["mlp"] = _mlp_matrices(f"{layer_prefix}.{name}", module, hidden_size)
        editable.components.append({key: value for key, value in components.items() if value})
    if not any(editable.components):
        raise UserError(
            f"{type(model).__name__} has no editable matrices: no attention output or MLP down projection "
            "was found in its decoder layers"
        )
    return editable


def _mlp_matrices(prefix: str, mlp: nn.Module, hidden_size: int) -> list[Matrix]:
    matrices: list[Matrix] = []
    experts = getattr(mlp, "experts", None)
    if isinstance(experts, nn.ModuleList):
        for number, expert in enumerate(experts):
            output = _first_child(expert, _MLP_OUTPUTS)
            if output is None:
                raise UserError(f"{prefix}.experts.{number} has no down projection this tool knows")
            matrices.append(_linear_matrix(f"{prefix}.experts.{number}.{output[0]}", output[1], hidden_size))
    elif isinstance(experts, nn.Module):
        matrices.append(_fused_experts_matrix(f"{prefix}.experts", experts, hidden_size))
    else:
        output = _first_child(mlp, _MLP_OUTPUTS)
        if output is not None:
            matrices.append(_linear_matrix(f"{prefix}.{output[0]}", output[1], hidden_size))
    shared = _first_child(mlp, _SHARED_EXPERTS)
    if shared is not None:
        output = _first_child(shared[1], _MLP_OUTPUTS)
        if output is not None:
            matrices.append(_linear_matrix(f"{prefix}.{shared[0]}.{output[0]}", output[1], hidden_size))
    return matrices


def _linear_matrix(name: str, module: nn.Module, hidden_size: int) -> Matrix:
    weight = getattr(module, "weight", None)
    # 4-bit weights are stored packed; their quantization state keeps the matrix's own shape.
    shape = tuple(
        getattr(getattr(weight, "quant_state", None), "shape", None) or getattr(weight, "shape", ())
    )
    if not isinstance(weight, torch.Tensor) or len(shape) != 2:
        raise UserError(f"{name} has no 2-D weight; its layout ({type(module).__name__}) is not supported")
    # GPT-2's Conv1D stores (in, out); nn.Linear and its quantized cousins store (out, in).
    out_axis = 1 if type(module).__name__ == "Conv1D" else 0
    if shape[out_axis] != hidden_size:
        raise UserError(
            f"{name} ({type(module).__name__}, shape {shape}) does not write {hidden_size} residual "
            "features along its output axis; this layout is not supported"
        )
    return Matrix(f"{name}.weight", weight, out_axis)


def _fused_experts_matrix(name: str, experts: nn.Module, hidden_size: int) -> Matrix:
    down = getattr(experts, "down_proj", None)
    if not isinstance(down, torch.Tensor) or down.dim() != 3:
        raise UserError(
            f"{name} ({type(experts).__name__}) has no fused 3-D down_proj; this MoE layout is not supported"
        )
    transposed = getattr(experts, "is_transposed", None)
    if transposed is None:
        # No declared layout: infer it from the shape, and refuse when the shape cannot tell.
        matching = [axis for axis in (1, 2) if down.shape[axis] == hidden_size]
        if len(matching) != 1:
            raise UserError(
                f"{name}.down_proj has shape {tuple(down.shape)}; cannot tell which axis is the residual stream"
            )
        out_axis = matching[0]
    else:
        out_axis = 2 if transposed else 1
    if down.shape[out_axis] != hidden_size:
        raise UserError(
            f"{name}.down_proj has shape {tuple(down.shape)}, not writing {hidden_size} residual features"
        )
    return Matrix(f"{name}.down_proj", down, out_axis)


def _first_child(module: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module):
            return name, child
    return None


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for candidate in (config, getattr(config, "text_config", None)):
        size = getattr(candidate, "hidden_size", None) or getattr(candidate, "n_embd", None)
        if size:
            return int(size)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None:
        raise UserError(f"cannot tell the hidden size of {type(model).__name__}")
    return int(embeddings.weight.shape[1])
