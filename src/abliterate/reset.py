"""Editing the model for a trial, and returning it to the original weights afterwards.

Every trial starts from the original model, so a study resets the model once per trial. An
`Editor` applies a trial's edits and undoes them:

- `InPlaceEditor` edits weights in place and tracks which (layer, component) pairs it touched;
  `reset()` hands exactly those to a `Restorer`, which puts the originals back in place:
    - `LayerCache`: clones of only the editable matrices, kept on each matrix's own device
      (`gpu-cache`) or in pinned host memory (`host-cache`), keyed like the model:
      `originals[layer][component] -> list[Tensor]`;
    - `DiskRestorer`: reads only the editable tensors back from the model's safetensors files;
    - `FullReload`: reloads every weight from disk (the slow baseline).
- `AdapterEditor` never writes weights: a forward hook on each editable module subtracts the
  rank-1 term the edit would have removed, and `reset()` zeroes it. It is the only way to edit
  4-bit weights, at the price of a slower forward pass; the compiled decoder serves it too.

All restores copy under `torch.no_grad()` into the existing parameters, so modules, hooks and
devices keep their identity and the result is bit-identical to the original.
"""

from __future__ import annotations

import functools
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from abliterate.ablation import ablate_
from abliterate.checkpoint import checkpoint_part, key_files, locate, parameter_part, safetensors_files
from abliterate.components import EditableModel, Matrix
from abliterate.conflicts import reset_conflict, row_norm_conflict
from abliterate.errors import UserError

GiB = 1024**3
STRATEGIES = ("gpu-cache", "host-cache", "disk", "reload", "adapter")


@dataclass(frozen=True)
class Edit:
    """Remove `weight` of `direction` from everything one component of one layer writes."""

    layer: int
    component: str
    direction: torch.Tensor
    weight: float


def apply_edit(editable: EditableModel, edit: Edit, row_norm: str = "none") -> None:
    """Write one edit into the weights of one component of one layer, in place."""
    for matrix in editable.components[edit.layer].get(edit.component, []):
        ablate_(matrix.view(), edit.direction, edit.weight, row_norm)


# -- restorers ---------------------------------------------------------------------------------


class Restorer(ABC):
    name: str
    device_bytes: int = 0  # extra accelerator memory held
    host_bytes: int = 0  # extra host memory held

    @abstractmethod
    def restore(self, touched: Iterable[tuple[int, str]]) -> None:
        """Put the original weights of the given (layer, component) pairs back in place."""


class LayerCache(Restorer):
    """Originals of the editable matrices only, per layer and component, on device or pinned host."""

    def __init__(self, editable: EditableModel, on_host: bool = False):
        self.editable = editable
        self.on_host = on_host
        self.name = "host-cache" if on_host else "gpu-cache"
        # Pinned memory lets the restore's host-to-device copies run asynchronously at full speed.
        pin = on_host and torch.cuda.is_available()
        self.originals: dict[int, dict[str, list[torch.Tensor]]] = {}
        for layer, components in enumerate(editable.components):
            self.originals[layer] = {}
            for component, matrices in components.items():
                copies = []
                for matrix in matrices:
                    source = matrix.parameter.detach()
                    if on_host:
                        # Allocated pinned up front: one copy, never a pageable one first.
                        copy = torch.empty(source.shape, dtype=source.dtype, pin_memory=pin).copy_(source)
                    else:
                        copy = source.clone()
                    copies.append(copy)
                self.originals[layer][component] = copies
        size = sum(
            t.numel() * t.element_size()
            for parts in self.originals.values()
            for ts in parts.values()
            for t in ts
        )
        on_accelerator = any(matrix.parameter.device.type != "cpu" for *_, matrix in editable.matrices())
        if on_host or not on_accelerator:
            self.host_bytes = size
        else:
            self.device_bytes = size

    @torch.no_grad()
    def restore(self, touched: Iterable[tuple[int, str]]) -> None:
        devices = set()
        for layer, component in touched:
            for matrix, original in zip(
                self.editable.components[layer][component], self.originals[layer][component], strict=True
            ):
                matrix.parameter.data.copy_(original, non_blocking=self.on_host)
                devices.add(matrix.parameter.device)
        if self.on_host:
            # Non-blocking host-to-device copies must land before the next forward pass reads them.
            for device in devices:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)


class DiskRestorer(Restorer):
    """Reads only the editable tensors back from the model's own safetensors files."""

    name = "disk"

    def __init__(self, editable: EditableModel, folder: Path | None):
        if folder is None or not safetensors_files(folder):
            raise UserError(
                "reset 'disk' needs the model's safetensors files on disk; use --reset gpu-cache or host-cache"
            )
        self.editable = editable
        self.folder = folder
        files = key_files(folder)
        try:
            self.sources: dict[str, list[tuple[Path, str]]] = {
                matrix.name: locate(matrix, files) for *_, matrix in editable.matrices()
            }
        except UserError as error:
            raise UserError(f"{error}; use a cache reset instead of 'disk'") from None

    @torch.no_grad()
    def restore(self, touched: Iterable[tuple[int, str]]) -> None:
        from safetensors import safe_open

        matrices = [
            matrix for layer, component in touched for matrix in self.editable.components[layer][component]
        ]
        by_file: dict[Path, list[tuple[Matrix, int, str]]] = {}
        for matrix in matrices:
            for position, (file, key) in enumerate(self.sources[matrix.name]):
                by_file.setdefault(file, []).append((matrix, position, key))
        for file, entries in by_file.items():
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for matrix, position, key in entries:
                    parts = len(self.sources[matrix.name])
                    original = checkpoint_part(matrix, parts, handle.get_tensor(key))
                    parameter_part(matrix, position, parts).copy_(original)


class FullReload(Restorer):
    """Reloads the whole model from disk into the existing parameters: the slow baseline."""

    name = "reload"

    def __init__(self, model: nn.Module, load: Callable[[], nn.Module]):
        self.model = model
        self.load = load

    @torch.no_grad()
    def restore(self, touched: Iterable[tuple[int, str]]) -> None:
        if not list(touched):
            return
        fresh = dict(self.load().named_parameters())
        for name, parameter in self.model.named_parameters():
            parameter.data.copy_(fresh[name])


# -- editors -----------------------------------------------------------------------------------


class Editor(ABC):
    name: str

    @abstractmethod
    def apply(self, edits: Iterable[Edit], row_norm: str = "none") -> None: ...

    @abstractmethod
    def reset(self) -> None: ...


class InPlaceEditor(Editor):
    def __init__(self, editable: EditableModel, restorer: Restorer, verify: bool = False):
        self.editable = editable
        self.restorer = restorer
        self.name = restorer.name
        self.touched: set[tuple[int, str]] = set()
        self.fingerprint = fingerprint(editable) if verify else None

    def apply(self, edits: Iterable[Edit], row_norm: str = "none") -> None:
        for edit in edits:
            # Mark before writing: an edit that fails half-way must still be restored.
            self.touched.add((edit.layer, edit.component))
            apply_edit(self.editable, edit, row_norm)

    def reset(self) -> None:
        self.restorer.restore(sorted(self.touched))
        self.touched.clear()
        if self.fingerprint is not None and fingerprint(self.editable) != self.fingerprint:
            raise RestoreMismatch(
                f"weights differ from the originals after a '{self.name}' reset; the {self.name} is corrupt. "
                "Run again with another --reset"
            )


class RestoreMismatch(UserError):
    """The weights after a reset differ from the originals: stop, since every later trial would be wrong."""


class AdapterEditor(Editor):
    """Rank-1 side path on each editable module's output; weights are never written."""

    name = "adapter"

    def __init__(self, model: nn.Module, editable: EditableModel):
        self.editable = editable
        self.hooks: dict[str, _RankOneHook] = {}
        for *_, matrix in editable.matrices():
            module_name, attribute = matrix.name.rsplit(".", 1)
            module = model.get_submodule(module_name)
            if attribute != "weight" and getattr(module, "has_bias", False):
                raise UserError(f"--reset adapter does not support fused experts with biases ({module_name})")
            hook = _RankOneHook(matrix, module, editable.hidden_size)
            hook.handle = module.register_forward_hook(hook)
            self.hooks[matrix.name] = hook

    def apply(self, edits: Iterable[Edit], row_norm: str = "none") -> None:
        conflict = row_norm_conflict(row_norm, "the adapter edits these weights")
        if conflict:
            raise UserError(conflict)
        for edit in edits:
            for matrix in self.editable.components[edit.layer].get(edit.component, []):
                self.hooks[matrix.name].set(edit.direction, edit.weight, row_norm)

    def reset(self) -> None:
        for hook in self.hooks.values():
            hook.clear()

    def remove(self) -> None:
        for hook in self.hooks.values():
            hook.handle.remove()


class _RankOneHook:
    """y' = y - w * u (v . (y - b)): the output the edited matrix would give, from the original output.

    For W' = W - w r r^T W this is u = v = r. With row normalization 'pre', W' = W - w D r r^T D^-1 W
    where D holds W's row norms, so u = D r and v = D^-1 r.

    u, v and w are tensors made once and rewritten in place, so that a compiled forward pass (the
    decoder's CUDA graphs, `decoding.py`) reads each trial's edit where it lies. A compiled forward
    always takes the side path, at w = 0 where nothing is edited: it must not depend on whether an
    edit is set, or it would be compiled again whenever that changes. An eager forward skips it.
    """

    def __init__(self, matrix: Matrix, module: nn.Module, hidden_size: int):
        self.matrix = matrix
        self.bias = getattr(module, "bias", None) if matrix.name.endswith(".weight") else None
        device = matrix.parameter.device
        self.u = torch.zeros(hidden_size, dtype=torch.float32, device=device)
        self.v = torch.zeros_like(self.u)
        self.weight = torch.zeros((), dtype=torch.float32, device=device)
        for tensor in (self.u, self.v, self.weight):
            # CUDA graphs read them at their addresses, instead of copying them in before every replay.
            torch._dynamo.mark_static_address(tensor)
        self.active = False
        self.handle = None

    @torch.no_grad()
    def set(self, direction: torch.Tensor, weight: float, row_norm: str) -> None:
        r = (direction / direction.norm()).float().to(self.u.device)
        if row_norm == "pre":
            norms = self._row_norms
            self.u.copy_(norms * r)
            self.v.copy_(r / norms)
        else:
            self.u.copy_(r)
            self.v.copy_(r)
        self.weight.fill_(weight)
        self.active = weight != 0.0

    @functools.cached_property
    def _row_norms(self) -> torch.Tensor:
        """The matrix's row norms, which no trial changes: dequantized once, not every trial. Clamped
        as the in-place edit clamps them (`ablation.ablate`): a zero row stays zero, not NaN."""
        norms = _dequantized(self.matrix).norm(dim=-1).float().clamp_min(torch.finfo(torch.float32).tiny)
        if norms.dim() > 1:
            raise UserError("--row-norm pre with --reset adapter is not supported for fused experts")
        return norms

    @torch.no_grad()
    def clear(self) -> None:
        self.weight.zero_()
        self.active = False

    def __call__(self, _module, _inputs, output):
        # `is_compiling` first: while compiling, `active` is never read, so nothing depends on it.
        if not torch.compiler.is_compiling() and not self.active:
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        written = hidden if self.bias is None else hidden - self.bias
        correction = self.weight * (written.float() @ self.v)[..., None] * self.u
        edited = (hidden.float() - correction).to(hidden.dtype)
        return (edited, *output[1:]) if isinstance(output, tuple) else edited


def _dequantized(matrix: Matrix) -> torch.Tensor:
    weight = matrix.parameter
    if hasattr(weight, "quant_state"):
        import bitsandbytes

        return bitsandbytes.functional.dequantize_4bit(weight.data, weight.quant_state)
    return matrix.view()


# -- choosing a strategy -------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    strategy: str
    reason: str


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def is_quantized(editable: EditableModel) -> bool:
    return any(hasattr(matrix.parameter, "quant_state") for *_, matrix in editable.matrices())


def choose_strategy(
    requested: str,
    cache_weights: bool,
    editable: EditableModel,
    free_device_bytes: Callable[[torch.device], int] | None = None,
    free_host_bytes: int | None = None,
) -> Choice:
    """`auto`: adapter for quantized weights, else the fastest cache that fits, else disk."""
    quantized = is_quantized(editable)
    if requested != "auto":
        conflict = reset_conflict(requested, quantized, cache_weights)
        if conflict:
            raise UserError(conflict)
        return Choice(requested, "requested")
    if quantized:
        return Choice("adapter", "4-bit weights cannot be edited in place")
    if not cache_weights:
        return Choice("disk", "--cache-weights false")
    per_device: dict[torch.device, int] = {}
    for *_, matrix in editable.matrices():
        per_device[matrix.parameter.device] = per_device.get(matrix.parameter.device, 0) + matrix.nbytes
    free_device_bytes = free_device_bytes or _free_device_bytes
    host_free = _free_host_bytes() if free_host_bytes is None else free_host_bytes
    accelerators = {device: size for device, size in per_device.items() if device.type != "cpu"}
    if not accelerators:
        if sum(per_device.values()) <= host_free - 2 * GiB:
            return Choice(
                "gpu-cache", f"fits: {host_free / GiB:.0f} GiB free in host memory, beside the CPU model"
            )
        return Choice("disk", f"no room for a cache: {host_free / GiB:.1f} GiB free")
    short = [
        device
        for device, size in accelerators.items()
        if size > free_device_bytes(device) - _evaluation_headroom(device)
    ]
    if not short:
        free = min(free_device_bytes(device) for device in accelerators)
        return Choice("gpu-cache", f"fits: {free / GiB:.0f} GiB free")
    if sum(per_device.values()) <= host_free - 2 * GiB:
        return Choice(
            "host-cache",
            f"not enough free memory on {short[0]}; {host_free / GiB:.0f} GiB free in host memory",
        )
    return Choice(
        "disk", f"no room for a cache on {short[0]} or in host memory ({host_free / GiB:.1f} GiB free)"
    )


def _free_device_bytes(device: torch.device) -> int:
    if device.type != "cuda":  # no portable way to ask other accelerators: keep the cache off them
        return 0
    return torch.cuda.mem_get_info(device)[0]


def _evaluation_headroom(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    # Generation needs room for the KV cache and activations of a full batch.
    return max(4 * GiB, int(0.15 * torch.cuda.get_device_properties(device).total_memory))


def _free_host_bytes() -> int:
    import psutil

    return psutil.virtual_memory().available


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def describe(choice: Choice, editable: EditableModel, model: nn.Module) -> str:
    cache, total = editable.editable_bytes, model_bytes(model)
    if choice.strategy in ("gpu-cache", "host-cache"):
        size = f"{human_bytes(cache)} = {100 * cache / total:.1f}% of {human_bytes(total)}"
        return f"reset: {choice.strategy}, {size} ({choice.reason})"
    return f"reset: {choice.strategy} ({choice.reason})"


def make_editor(
    strategy: str,
    model: nn.Module,
    editable: EditableModel,
    folder: Path | None,
    reload: Callable[[], nn.Module] | None = None,
    verify: bool = False,
) -> Editor:
    offloaded = editable.offloaded()
    if offloaded:  # the pipeline says so earlier, with the fix; this guards library callers
        raise UserError(
            f"editable matrices are offloaded ({offloaded[0]}, {len(offloaded)} in all): edits cannot reach them"
        )
    if strategy == "adapter":
        if folder is None:  # found now, not after the study: the save merges the edit into those files
            raise UserError(
                "--reset adapter saves by editing the model's files, but none are on disk; download the model first"
            )
        return AdapterEditor(model, editable)
    if strategy == "gpu-cache":
        restorer: Restorer = LayerCache(editable)
    elif strategy == "host-cache":
        restorer = LayerCache(editable, on_host=True)
    elif strategy == "disk":
        restorer = DiskRestorer(editable, folder)
    elif strategy == "reload":
        if reload is None:
            raise UserError("reset 'reload' needs the model on disk")
        restorer = FullReload(model, reload)
    else:
        raise UserError(f"unknown reset strategy {strategy!r}; choose from auto, {', '.join(STRATEGIES)}")
    return InPlaceEditor(editable, restorer, verify=verify)


# -- verification --------------------------------------------------------------------------------


def fingerprint(editable: EditableModel) -> str:
    """SHA-256 over the raw bytes of every editable matrix."""
    digest = hashlib.sha256()
    for *_, matrix in editable.matrices():
        tensor = matrix.parameter.detach()
        as_integers = tensor.contiguous().view(_SAME_SIZE_INTEGER[tensor.element_size()])
        digest.update(as_integers.cpu().numpy().tobytes())
    return digest.hexdigest()


_SAME_SIZE_INTEGER = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
