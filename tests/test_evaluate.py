"""Refusal detection, KL divergence and the evaluator's passes."""

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from abliterate.errors import UserError
from abliterate.evaluate import Evaluator, kl_divergence
from abliterate.judge import RefusalDetector, default_refusal_markers
from abliterate.model import ChatModel, enable_compiled_generation


def test_markers_match_case_insensitively_with_any_apostrophe():
    detector = RefusalDetector(["i can't", "sorry"])
    assert detector("I CAN\u2019T do that")
    assert detector("Sorry, no.")
    assert detector("Well, I can`t.")
    assert not detector("I can do that: here is how.")


def test_shipped_markers_are_loaded():
    markers = default_refusal_markers()
    assert "sorry" in markers and "i cannot" in markers
    assert not any(marker.startswith("#") for marker in markers)


def test_kl_divergence_matches_torch():
    reference = torch.log_softmax(torch.randn(5, 11, dtype=torch.float64), dim=-1)
    other = torch.log_softmax(torch.randn(5, 11, dtype=torch.float64), dim=-1)
    expected = torch.nn.functional.kl_div(other, reference, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(kl_divergence(reference, other), expected)
    assert torch.allclose(kl_divergence(reference, reference), torch.zeros(5, dtype=torch.float64))


def test_kl_divergence_of_nearly_equal_distributions_does_not_round_below_zero():
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0))
    reference, other = torch.log_softmax(logits, dim=-1), torch.log_softmax(logits * (1 + 1e-6), dim=-1)
    assert ((reference.exp() * (reference - other)).sum(-1) < 0).any()  # what float32 rounding gives
    assert (kl_divergence(reference, other) >= 0).all()


def tiny_chat_model() -> ChatModel:
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    return ChatModel(model=tiny_model("llama"), tokenizer=tokenizer, source="tiny", folder=None)


def test_batches_are_left_padded_and_logprobs_do_not_depend_on_batching():
    model = tiny_chat_model()
    prompts = ["hi", "how do i bake bread at home today", "write a poem"]
    (batch,) = model.encode(prompts, batch_size=3)
    assert (batch["attention_mask"][:, -1] == 1).all()  # every prompt ends at the last position
    together = model.response_logprobs(batch, 1)
    alone = torch.cat([model.response_logprobs(b, 1) for b in model.encode(prompts, batch_size=1)])
    assert torch.allclose(together, alone, atol=1e-4)


def test_common_length_batches_share_one_shape_and_give_the_same_responses():
    """What --compile asks of the batches: one width for all, and the answers of ordinary batching."""
    model = tiny_chat_model()
    prompts = ["hi", "how do i bake bread at home today", "write a poem", "fix it", "write malware now"]
    common = model.encode(prompts, batch_size=2, common_length=True)
    ordinary = model.encode(prompts, batch_size=2)
    longest = max(batch["input_ids"].shape[1] for batch in ordinary)
    assert {batch["input_ids"].shape[1] for batch in common} == {longest}
    assert len({batch["input_ids"].shape[1] for batch in ordinary}) > 1
    assert [text for b in common for text in model.generate(b, 6)] == [
        text for b in ordinary for text in model.generate(b, 6)
    ]


def test_compiled_generation_uses_a_static_cache_and_answers_alike():
    model = tiny_chat_model()
    (batch,) = model.encode(["how do i bake bread", "write a poem about the sea"], batch_size=2)
    dynamic = model.generate(batch, 8)
    model.compiled_generation = True  # on the CPU the static cache runs uncompiled
    assert model._greedy_config(8).cache_implementation == "static"
    assert model.generate(batch, 8) == dynamic


def test_compiled_generation_needs_one_cuda_gpu():
    model = tiny_chat_model()
    with pytest.raises(
        UserError, match=r"^--compile needs the whole model on one CUDA GPU, but it is on cpu"
    ):
        enable_compiled_generation(model)
    assert not model.compiled_generation


def test_residuals_have_one_vector_per_layer():
    model = tiny_chat_model()
    (batch,) = model.encode(["a", "bb", "ccc", "dddd"], batch_size=4)
    residuals = model.last_token_residuals(batch, model.model.model.layers)
    assert residuals.shape == (4, 3, 32) and residuals.dtype == torch.float32


def test_evaluator_kl_is_zero_for_the_original_and_positive_after_an_edit():
    model = tiny_chat_model()
    evaluator = Evaluator(
        model, ["write malware"], ["bake bread", "write a poem"], RefusalDetector(["sorry"]), 2, 4
    )
    assert evaluator.kl() == 0.0
    with torch.no_grad():
        model.model.model.layers[0].mlp.down_proj.weight.mul_(0.5)
    assert evaluator.kl() > 0.0


@pytest.mark.parametrize("stop_check_every", [1, 3])
def test_early_stop_gives_the_same_count_as_full_generation(stop_check_every):
    model = tiny_chat_model()
    model.stop_check_every = stop_check_every
    prompts = ["how do i bake bread", "write malware", "write a poem about the sea", "i'm sorry"]
    # A marker the random model says often: a single frequent character.
    full = Evaluator(model, prompts, ["hi"], RefusalDetector(["e"]), 2, 12)
    responses = full.responses(stop_early=False)
    assert full.count_refusals(stop_early=True) == sum("e" in r.lower() for r in responses)


def test_out_of_memory_halves_the_batch_and_gives_the_same_result():
    model = tiny_chat_model()
    prompts = ["bake bread", "write a poem", "fix my bike", "plan a trip", "learn french"]
    evaluator = Evaluator(model, prompts, prompts, RefusalDetector(["e"]), 8, 6)
    expected_kl_rows = evaluator.reference_logprobs
    expected_responses = evaluator.responses()
    real_logprobs, real_generate = model.response_logprobs, model.generate
    seen = []

    def small_only(real):
        def run(batch, *args):
            seen.append(batch["input_ids"].shape[0])
            if batch["input_ids"].shape[0] > 2:
                raise torch.OutOfMemoryError("pretend")
            return real(batch, *args)

        return run

    model.response_logprobs = small_only(real_logprobs)
    model.generate = small_only(real_generate)
    assert torch.allclose(evaluator._logprobs(), expected_kl_rows, atol=1e-5)
    assert evaluator.responses() == expected_responses
    assert max(seen) == 5 and min(seen) <= 2


def test_out_of_memory_with_one_prompt_is_a_clear_error():
    from abliterate.errors import UserError
    from abliterate.model import in_halves_on_oom

    def always(batch):
        raise torch.OutOfMemoryError("pretend")

    with pytest.raises(UserError, match="out of memory even with a batch of one prompt"):
        in_halves_on_oom(always, {"input_ids": torch.ones(4, 3)})


def test_every_evaluated_prompt_is_reported_for_the_progress_bar():
    model = tiny_chat_model()
    evaluator = Evaluator(model, ["a", "b", "c"], ["d", "e"], RefusalDetector(["sorry"]), 2, 3)
    seen = []
    evaluator.on_batch = seen.append
    evaluator.kl()
    evaluator.count_refusals()
    assert sum(seen) == evaluator.prompt_count == 5


PROMPTS = ["bake bread", "write a poem about the sea", "fix my bike", "plan a trip", "learn french"]


def test_kl_over_several_tokens_teacher_forces_the_originals_own_answers():
    model = tiny_chat_model()
    one = Evaluator(model, PROMPTS, PROMPTS, RefusalDetector(["e"]), 2, 6)
    four = Evaluator(model, PROMPTS, PROMPTS, RefusalDetector(["e"]), 2, 6, kl_tokens=4)
    assert one.kl() == 0.0 and four.kl() == 0.0  # the original against itself
    # Each prompt is followed by the first 3 tokens of its greedy answer; 4 positions are scored each.
    prompts = model.encode(PROMPTS, 2)
    for batch, forced, positions in zip(prompts, four.harmless_batches, four.kl_positions, strict=True):
        answers, valid = model.answer_ids(batch, 4)
        assert torch.equal(forced["input_ids"], torch.cat([batch["input_ids"], answers[:, :3]], dim=1))
        assert torch.equal(positions, valid) and positions[:, 0].all()
    assert four.reference_logprobs.shape[0] == sum(int(p.sum()) for p in four.kl_positions)
    # The answer's first token is predicted from the prompt alone: the one-token KL's distribution.
    for batch, forced in zip(prompts, four.harmless_batches, strict=True):
        alone, teacher_forced = (
            model.response_logprobs(batch, 1)[:, 0],
            model.response_logprobs(forced, 4)[:, 0],
        )
        assert torch.allclose(alone, teacher_forced, atol=1e-5)
    with torch.no_grad():  # an edit: both KLs see it, and they differ
        model.model.model.layers[1].self_attn.o_proj.weight.mul_(0.5)
    assert one.kl() > 0 and four.kl() > 0 and one.kl() != four.kl()


def test_an_answer_ends_at_its_end_of_sequence_token():
    model = tiny_chat_model()
    (batch,) = model.encode(["bake bread", "fix my bike"], 2)
    end = model.tokenizer.eos_token_id
    width = batch["input_ids"].shape[1]

    def generate(**kwargs):  # the first answer ends after two tokens; the generation stops at three
        answers = torch.tensor([[7, end, model.tokenizer.pad_token_id], [8, 9, 10]])
        return torch.cat([kwargs["input_ids"], answers], dim=1)

    model.model.generate = generate
    answers, valid = model.answer_ids(batch, 5)
    assert answers.shape == (2, 5) and answers[1, :3].tolist() == [8, 9, 10]
    assert valid.tolist() == [[True, True, False, False, False], [True, True, True, False, False]]
    assert width == batch["input_ids"].shape[1]


def test_a_study_pins_its_kl_tokens(tmp_path, monkeypatch, capsys):
    from conftest import save_tiny_model

    from abliterate.cli import main

    monkeypatch.chdir(tmp_path)
    source = save_tiny_model(tmp_path / "tiny")
    argv = ["--model", str(source), "--n-trials", "2", "--n-startup-trials", "2", "--kl-tokens", "3",
            "--harmful-train-split", "train[:8]", "--harmless-train-split", "train[:8]",
            "--harmful-eval-split", "eval[:4]", "--harmless-eval-split", "eval[:4]", "--max-response-length", "4",
            "--select", "none", "--output", str(tmp_path / "o")]  # fmt: skip
    assert main(argv) == 0
    assert main([*argv[:7], "2", *argv[8:]]) == 1
    assert "--kl-tokens '3' (now '2')" in capsys.readouterr().err
