"""The bytes of a model saved from the demo model with fixed edits: silent numeric drift anywhere
between the parameters and the written file (kernel weights, interpolation, the edit, the export)
changes this hash. A deliberate change of any of them updates it, and says why in its commit."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from abliterate.components import find_components
from abliterate.export import ModelCard, save_model
from abliterate.model import load_chat_model
from abliterate.reset import apply_edit
from abliterate.space import SearchSpace, edits_from_params

SAVED_SHA256 = "d995180da3ad9b95bc48a7d3918a5a27071fccef7a9f2e33d1006daa4721b315"


def test_a_saved_demo_model_has_pinned_bytes(tmp_path: Path):
    chat = load_chat_model(None, dtypes=["float32"], device_map="cpu")
    editable = find_components(chat.model)
    generator = torch.Generator().manual_seed(0)
    hidden = chat.model.config.hidden_size
    basis = torch.nn.functional.normalize(
        torch.randn(2, editable.num_layers, hidden, generator=generator), dim=-1
    )
    params = {
        **SearchSpace(editable.num_layers, direction_scope="search", projection="search").warm_starts()[0],
        "direction_index": 2.5,
        "direction_projection": 0.75,
        "mlp.max_weight": 1.25,
        "mlp.min_weight_distance": 2.0,
    }
    for edit in edits_from_params(params, basis):
        apply_edit(editable, edit, "full")
    card = ModelCard("demo", 0, params, 1, 10, 9, 0.1, "abliterate")
    saved = save_model(chat.model, chat.tokenizer_to_save, tmp_path, card)
    digest = hashlib.sha256((saved / "model.safetensors").read_bytes()).hexdigest()
    assert digest == SAVED_SHA256
