"""Rendering and masking: exact trained segments on literal conversations, per model family."""

import pytest
from transformers import AutoTokenizer

from chattune.data.chat_templates import BUILTIN_TEMPLATES, setup_chat_template
from chattune.data.encode import IGNORE_INDEX, text_pieces, tokenize_samples
from chattune.data.report import trained_segments
from chattune.data.template import RenderedSample, make_renderer, render_conversation
from chattune.data.tokenizer import prepare_tokenizer
from chattune.errors import TemplateError

SYS = {"role": "system", "content": "You are terse."}


def U(text):
    return {"role": "user", "content": text}


def A(text, **kw):
    return {"role": "assistant", "content": text, **kw}


@pytest.fixture(scope="module")
def toks(model_dirs):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = prepare_tokenizer(str(model_dirs(family)), "auto")
        return cache[family]

    return get


def encode(tok, setup, messages, **template_kwargs):
    samples = render_conversation(make_renderer(tok, template_kwargs), messages, setup.stop_tokens)
    return samples, tokenize_samples(tok, samples)


def check_reference(tok, messages, ids, **template_kwargs):
    """The ids are exactly what apply_chat_template(tokenize=True) gives for the same conversation."""
    ref = tok.apply_chat_template(messages, tokenize=True, return_dict=True, **template_kwargs)["input_ids"]
    assert ids == ref


# ------------------------------------------------------------------ pure span -> label mapping


def test_text_pieces_literal():
    """A sample's text cut at its trained spans (each piece is tokenized on its own): [start, end, trained]."""
    sample = RenderedSample("0123456789AB", spans=[(9, 12), (4, 6)])  # given out of order
    assert text_pieces(sample) == [(0, 4, False), (4, 6, True), (6, 9, False), (9, 12, True)]
    assert text_pieces(RenderedSample("abc")) == [(0, 3, False)]
    assert text_pieces(RenderedSample("")) == [(0, 0, False)]


# ------------------------------------------------------------------ per family, literal trained segments


def test_qwen2_single_turn(toks):
    tok, setup = toks("qwen2")
    msgs = [SYS, U("What is 2+2?"), A("4.")]
    samples, [(ids, labels)] = encode(tok, setup, msgs)
    check_reference(tok, msgs, ids)
    assert trained_segments(tok, ids, labels) == ["4.<|im_end|>"]
    assert samples[0].text.endswith("<|im_start|>assistant\n4.<|im_end|>\n")
    # the newline after <|im_end|> is never generated, so it is not trained
    assert labels[-1] == IGNORE_INDEX and ids[-1] == tok.convert_tokens_to_ids("Ċ")


def test_qwen2_multi_turn_trains_every_answer_and_default_system(toks):
    tok, setup = toks("qwen2")
    msgs = [U("Hi"), A("Hello! How can I help?"), U("Say 你好 in code:"), A("```python\nprint('你好')  \n```  ")]
    _, [(ids, labels)] = encode(tok, setup, msgs)
    check_reference(tok, msgs, ids)
    assert tok.decode(ids).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert trained_segments(tok, ids, labels) == [
        "Hello! How can I help?<|im_end|>",
        "```python\nprint('你好')  \n```  <|im_end|>",
    ]


def test_qwen2_bpe_merge_across_boundary_gives_the_inference_prompt(toks):
    """'assistant\n' + '\n\n...' would merge into one '\n\n\n' token in the conversation tokenized at once. The
    prompt is tokenized as inference tokenizes it ('assistant', '\n') and the answer as its own continuation."""
    tok, setup = toks("qwen2")
    msgs = [U("x"), A("\n\n  def f():\n    return 1")]
    samples, [(ids, labels)] = encode(tok, setup, msgs)
    first = next(k for k, label in enumerate(labels) if label != IGNORE_INDEX)
    assert ids[:first] == tok.apply_chat_template(msgs[:1], add_generation_prompt=True, return_dict=True)["input_ids"]
    assert tok.convert_ids_to_tokens(ids[first - 2:first]) == ["assistant", "Ċ"]
    answer = tok("\n\n  def f():\n    return 1<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[first:first + len(answer)] == answer and labels[first:first + len(answer)] == answer
    assert "".join(trained_segments(tok, ids, labels)) == "\n\n  def f():\n    return 1<|im_end|>"
    whole = tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
    assert tok.convert_tokens_to_ids("ĊĊĊ") in whole and ids != whole  # what training on the whole text would do


def test_deepseek_space_after_generation_prompt_is_trained(toks):
    """DeepSeek's generation prompt is 'Assistant:'; the model must write ' answer' including the space."""
    tok, setup = toks("deepseek")
    msgs = [SYS, U("Hi"), A("Hello"), U("Bye"), A("See you.")]
    samples, [(ids, labels)] = encode(tok, setup, msgs)
    check_reference(tok, msgs, ids)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert trained_segments(tok, ids, labels) == [" Hello<｜end▁of▁sentence｜>", " See you.<｜end▁of▁sentence｜>"]


def test_deepseek_v2_moe_family(toks):
    tok, setup = toks("deepseek_v2")
    msgs = [U("写一首诗"), A("床前明月光。")]
    _, [(ids, labels)] = encode(tok, setup, msgs)
    check_reference(tok, msgs, ids)
    assert trained_segments(tok, ids, labels) == [" 床前明月光。<｜end▁of▁sentence｜>"]


@pytest.mark.slow
def test_glm4_turns_closed_by_next_role_token_and_eos_appended(toks):
    """GLM-4 ends an answer with the next <|user|> (a generation stop token) and leaves the last one open."""
    tok, setup = toks("glm4")
    assert setup.stop_tokens == ("<|endoftext|>", "<|user|>", "<|observation|>")
    msgs = [U("Hi"), A("Hello"), U("Bye"), A("Ciao")]
    samples, [(ids, labels)] = encode(tok, setup, msgs)
    assert samples[0].eos_appended
    ref = tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
    assert ids == ref + [tok.convert_tokens_to_ids("<|endoftext|>")]
    assert trained_segments(tok, ids, labels) == ["\nHello<|user|>", "\nCiao<|endoftext|>"]


def test_qwen3_history_rewrite_is_trained_per_turn(toks):
    """Qwen3 drops earlier reasoning: turn 1 is trained in a sample of its own, with the history it has at inference."""
    tok, setup = toks("qwen3")
    msgs = [U("Q1"), A("A1", reasoning_content="think 1"), U("Q2"), A("A2", reasoning_content="think 2")]
    samples, encoded = encode(tok, setup, msgs)
    assert [s.own_turn for s in samples] == [False, True]
    (ids_full, lab_full), (ids_t1, lab_t1) = encoded
    check_reference(tok, msgs, ids_full)
    check_reference(tok, msgs[:2], ids_t1)
    assert trained_segments(tok, ids_full, lab_full) == ["<think>\nthink 2\n</think>\n\nA2<|im_end|>"]
    assert trained_segments(tok, ids_t1, lab_t1) == ["<think>\nthink 1\n</think>\n\nA1<|im_end|>"]


def test_qwen3_without_thinking_prompt_trains_answer_only(toks):
    tok, setup = toks("qwen3")
    msgs = [U("Q"), A("A")]
    samples, [(ids, labels)] = encode(tok, setup, msgs, enable_thinking=False)
    check_reference(tok, msgs, ids, enable_thinking=False)
    # with thinking off, the empty think block is part of the prompt, not of what the model writes
    assert trained_segments(tok, ids, labels) == ["A<|im_end|>"]


# ------------------------------------------------------------------ template selection and failures


def test_auto_without_template_lists_choices(toks):
    tok, _ = toks("qwen2")
    bare = tok.__class__.from_pretrained(tok.name_or_path)
    bare.chat_template = None
    with pytest.raises(TemplateError, match="pass --template with one of: chatml, qwen, deepseek"):
        setup_chat_template(bare, "auto")
    with pytest.raises(TemplateError, match="unknown --template 'vicuna'; choose one of: auto, chatml"):
        setup_chat_template(bare, "vicuna")


def test_builtin_llama3_adds_missing_special_tokens(model_dirs):
    tok = AutoTokenizer.from_pretrained(model_dirs("deepseek"))
    n = len(tok)
    setup = setup_chat_template(tok, "llama3")
    assert setup.added_tokens == ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    assert len(tok) == n + 3 and setup.stop_tokens[0] == "<|eot_id|>"
    msgs = [U("Hi"), A("  Hello  ")]
    samples, [(ids, labels)] = encode(tok, setup, msgs)
    check_reference(tok, msgs, ids)
    assert trained_segments(tok, ids, labels) == ["Hello<|eot_id|>"]  # llama3 trims content


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_every_builtin_template_renders_and_masks(model_dirs, name):
    tok = AutoTokenizer.from_pretrained(model_dirs("qwen2"))
    tok.bos_token = "<|endoftext|>"
    setup = setup_chat_template(tok, name)
    msgs = [SYS, U("a"), A("b"), U("c"), A("d")]
    samples, [(ids, labels)] = encode(tok, setup, msgs)
    check_reference(tok, msgs, ids)
    segments = trained_segments(tok, ids, labels)
    assert len(segments) == 2 and all(any(s.endswith(t) for t in setup.stop_tokens) for s in segments)
    assert "b" in segments[0] and "d" in segments[1] and "a" not in "".join(segments)


def test_prefix_inconsistent_template_is_refused(model_dirs):
    tok = AutoTokenizer.from_pretrained(model_dirs("qwen2"))
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}<bot>{% endif %}"
    )
    setup = setup_chat_template(tok, "auto")
    with pytest.raises(TemplateError, match="not prefix consistent"):
        encode(tok, setup, [U("a"), A("b")])
