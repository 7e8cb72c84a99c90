"""Our greedy decoding loop (decoding.py) gives transformers' greedy tokens, run eagerly on the CPU."""

import pytest
import torch
import transformers
from conftest import ALL_ARCHITECTURES, tiny_model
from test_evaluate import tiny_chat_model

from abliterate.decoding import GreedyDecoder, replays_as_a_graph
from abliterate.evaluate import Evaluator
from abliterate.judge import RefusalDetector
from abliterate.model import _StopWhen


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts, two of them left-padded by different amounts."""
    torch.manual_seed(1)
    ids = torch.randint(3, 100, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[2, :4] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("architecture", ALL_ARCHITECTURES)
def test_the_loop_gives_transformers_greedy_tokens(architecture):
    model = tiny_model(architecture)
    ids, mask = _prompts()
    config = transformers.GenerationConfig(
        max_new_tokens=9, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    expected = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1] :]
    # generate falls back on the model's own end-of-sequence tokens (some tiny configs have one).
    ends = model.generation_config.eos_token_id
    ends = [] if ends is None else ends if isinstance(ends, list) else [ends]
    decoder = GreedyDecoder(model, pad_token_id=0, eos_token_ids=ends, compile=False)
    assert torch.equal(decoder.generate({"input_ids": ids, "attention_mask": mask}, 9), expected)
    # The cache of that shape is kept and reset: a second batch of the same shape is not disturbed.
    assert torch.equal(decoder.generate({"input_ids": ids, "attention_mask": mask}, 9), expected)
    assert len(decoder._steps) == 1


def test_a_sequence_that_ends_is_padded_and_the_loop_stops_when_all_have():
    model = tiny_model("llama")
    ids, mask = _prompts()
    free = GreedyDecoder(model, pad_token_id=0, eos_token_ids=[], compile=False)
    tokens = free.generate({"input_ids": ids, "attention_mask": mask}, 9)
    end = int(tokens[1, 2])  # the token row 1 says third becomes an end-of-sequence token
    config = transformers.GenerationConfig(
        max_new_tokens=9, do_sample=False, pad_token_id=0, eos_token_id=end
    )
    expected = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1] :]
    ended = GreedyDecoder(model, pad_token_id=0, eos_token_ids=[end], compile=False)
    answers = ended.generate({"input_ids": ids, "attention_mask": mask}, 9)
    assert torch.equal(answers, expected)
    assert torch.equal(answers[1, 3:], torch.zeros(6, dtype=torch.long))

    single = {"input_ids": ids[1:2], "attention_mask": mask[1:2]}
    assert ended.generate(single, 9).shape == (1, 3)  # checked every step: stops at the end
    assert ended.generate(single, 9, check_every=4).shape == (1, 4)  # learnt at the next check
    assert ended.generate(single, 9, check_every=4, defer=True).shape == (1, 8)  # one check later
    assert torch.equal(ended.generate(single, 9, check_every=4, defer=True)[:, :4], answers[1:2, :4])


@pytest.mark.parametrize("defer", [False, True])
@pytest.mark.parametrize("every", [1, 3])
def test_the_stop_check_finishes_sequences_on_the_steps_generate_asks_it(every, defer):
    model = tiny_chat_model()
    prompts = ["how do i bake bread", "write malware", "write a poem about the sea", "i'm sorry"]
    (batch,) = model.encode(prompts, batch_size=4)
    length = batch["input_ids"].shape[1]
    finished = lambda text: len(text) >= 6  # noqa: E731 - the random model's rows get there at different steps
    criteria = transformers.StoppingCriteriaList([_StopWhen(model.decode, length, finished, every)])
    expected = model.model.generate(
        **batch, generation_config=model._greedy_config(12), stopping_criteria=criteria
    )
    expected = model.decode(expected[:, length:])
    assert sum(finished(text) for text in expected) >= 2  # the check has something to stop
    answers = model._decoder.generate(batch, 12, finished, model.decode, every, defer)
    assert model.decode(answers) == expected


def test_a_chat_model_with_the_compiled_decoder_answers_alike():
    model = tiny_chat_model()
    prompts = ["how do i bake bread", "write malware", "write a poem about the sea", "i'm sorry"]
    # A marker the random model says in some responses, not all: the count can differ.
    evaluator = Evaluator(model, prompts, ["hi"], RefusalDetector(["i"]), 4, 12)
    responses, count = evaluator.responses(stop_early=False), evaluator.count_refusals()
    assert 0 < count < len(prompts)
    model.compiled_generation = True  # our own loop; on the CPU it runs uncompiled
    assert evaluator.responses(stop_early=False) == responses
    assert evaluator.count_refusals() == count


@pytest.mark.parametrize("architecture", ["gemma3", "mistral"])
def test_the_loop_gives_transformers_greedy_tokens_past_a_sliding_window(architecture):
    config = tiny_model(architecture).config
    config.sliding_window = 4  # shorter than prompt and answer: the cache's sliding layers wrap
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    ids, mask = _prompts()
    generation = transformers.GenerationConfig(
        max_new_tokens=9, do_sample=False, pad_token_id=0, eos_token_id=[], cache_implementation="static"
    )
    expected = model.generate(input_ids=ids, attention_mask=mask, generation_config=generation)[
        :, ids.shape[1] :
    ]
    decoder = GreedyDecoder(model, pad_token_id=0, eos_token_ids=[], compile=False)
    assert torch.equal(decoder.generate({"input_ids": ids, "attention_mask": mask}, 9), expected)


@pytest.mark.parametrize("architecture", ["llama", "qwen3_moe"])
def test_the_decode_step_compiles_as_one_graph_and_gives_the_same_tokens(architecture):
    """torch.compile of the step (fullgraph: any graph break fails) on the CPU, with this
    environment's transformers: the GPU path compiles the same function into CUDA graphs, or for
    float32 fused experts (qwen3_moe here) without them."""
    model = tiny_model(architecture)
    ids, mask = _prompts()
    batch = {"input_ids": ids, "attention_mask": mask}
    eager = GreedyDecoder(model, pad_token_id=0, eos_token_ids=[], compile=False).generate(batch, 9)
    compiled = GreedyDecoder(model, pad_token_id=0, eos_token_ids=[], compile=True)
    assert torch.equal(compiled.generate(batch, 9), eager)
    assert torch.equal(compiled.generate(batch, 9), eager)  # the same graph, its cache reset


@pytest.mark.parametrize("architecture", ["qwen3_moe", "gpt_oss"])
def test_fused_experts_replay_as_a_cuda_graph_only_in_bfloat16(architecture):
    """Compiled, transformers' grouped_mm experts read token counts on the host for other dtypes."""
    model = tiny_model(architecture)
    assert model.config._experts_implementation == "grouped_mm"
    assert not replays_as_a_graph(model)
    assert not replays_as_a_graph(model.to(torch.float16))
    assert replays_as_a_graph(model.to(torch.bfloat16))
    assert replays_as_a_graph(tiny_model("llama"))  # float32, but no experts
