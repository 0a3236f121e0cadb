"""The linear-time encoder (chattune.data.splits) against the reference path that tokenizes every later answer's whole
prompt: the same ids and labels, sample for sample, over conversations of 1 to 40 turns on the published templates,
and the tokenizers it must not be used for."""

import random

import pytest
from test_real_templates import CALL, RESULT, SEARCH, WEATHER, A, U, tokenizer

from chattune.data import encode
from chattune.data.chat_templates import setup_chat_template
from chattune.data.splits import SplitEncoder, factorizes
from chattune.data.template import make_renderer, render_conversation

FAMILIES = ["qwen2_5", "qwen3", "qwen3_thinking_2507", "qwen3_5", "qwen3_6", "qwen3_8", "llama3_1", "deepseek_llm",
            "glm4"]
TOOLS = {"qwen2_5", "qwen3", "qwen3_5", "qwen3_6", "qwen3_8", "llama3_1"}
# "e\u0301" (a combining accent) is changed by Unicode normalization, which Qwen's tokenizer applies (NFC)
WORDS = ["the", "model", "answers", "code", "x = 1", "数据", "e\u0301migré", "🙂", "1234567", "  spaced", "tab\tbed",
         "end."]
# How an answer may begin: each of these merges differently with the generation prompt's last token
STARTS = ["", "\n", "\n\n", " ", "  ", "\t", "```python\n", "1.", "<", "'"]


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def conversation(rng: random.Random, turns: int, family: str) -> tuple[list[dict], list[dict]]:
    tools = family in TOOLS and rng.random() < 0.5
    messages = [{"role": "system", "content": text(rng, 6)}] if rng.random() < 0.4 and family != "glm4" else []
    for _ in range(turns):
        messages.append(U(rng.choice(STARTS) + text(rng, rng.randint(1, 12)) + rng.choice(["", "\n", " "])))
        if tools and rng.random() < 0.3:
            messages += [CALL, RESULT]
        reasoning = {"reasoning_content": text(rng, 5)} if rng.random() < 0.4 and family.startswith("qwen3") else {}
        messages.append(A(rng.choice(STARTS) + text(rng, rng.randint(0, 20)) + rng.choice(["", "\n"]), **reasoning))
    return messages, ([WEATHER, SEARCH] if tools else [])


def samples_of(family: str, seed: int, count: int):
    tok, extra = tokenizer(family)
    stops = setup_chat_template(tok, "auto", extra).stop_tokens
    rng = random.Random(seed)
    samples = []
    for k in range(count):
        messages, tools = conversation(rng, 1 + (k * 7) % 40, family)
        samples += render_conversation(make_renderer(tok), messages, stops, tools=tools)
    return tok, samples


def as_lists(encoded):
    return [[(ids.tolist(), labels.tolist()) for ids, labels in sample] for sample in encoded]


@pytest.mark.parametrize("family", [f if f in ("qwen2_5", "qwen3_5") else pytest.param(f, marks=pytest.mark.slow)
                                    for f in FAMILIES])
def test_the_split_encoder_equals_the_reference_on_conversations_of_1_to_40_turns(family):
    tok, samples = samples_of(family, seed=len(family), count=24)
    assert factorizes(tok)  # the fast path is the one under test
    fast = SplitEncoder(tok).encode(samples, encode.text_pieces)
    assert fast is not None
    assert as_lists(encode.encode_samples(tok, samples)) == as_lists(encode._encode_reference(tok, samples))
    # every answer the reference trains on its own was flagged by a window (the rest needed no whole prompt)
    found = sum(prompt is not None for _, later in fast for prompt in later)
    assert sum(len(e) - 1 for e in encode._encode_reference(tok, samples)) <= found


def test_ascii_texts_skip_only_a_normalizer_that_leaves_them_unchanged():
    """Qwen2+'s tokenizer applies NFC, which changes no ASCII text: ASCII texts are tokenized without the normalizer,
    the others with it, each giving the tokenizer's own ids, sample for sample as the reference path; the tokenizer
    keeps its normalizer."""
    from tokenizers import normalizers

    tok, samples = samples_of("qwen2_5", seed=5, count=12)
    tok.backend_tokenizer.normalizer = normalizers.NFC()  # as in Qwen2+'s tokenizer.json (the fixture has none)
    texts = ["plain ascii, 12 tabs\t", "cafe\u0301 au lait", "caf\u00e9", "数据 and ascii", "e\u0301" * 3, "x"]
    encoder = SplitEncoder(tok)
    assert encoder.ascii_skips_normalizer
    assert encoder.tokenize(texts) == tok(texts, add_special_tokens=False)["input_ids"]
    assert encoder.tokenize(["cafe\u0301"]) == encoder.tokenize(["caf\u00e9"])  # normalized: the same ids
    assert type(tok.backend_tokenizer.normalizer).__name__ == "NFC"
    assert any("e\u0301" in sample.text for sample in samples)
    assert as_lists(encode.encode_samples(tok, samples)) == as_lists(encode._encode_reference(tok, samples))
    # a normalizer that changes ASCII text is always applied
    tok.backend_tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    encoder = SplitEncoder(tok)
    assert not encoder.ascii_skips_normalizer
    assert encoder.tokenize(["The Model", "the model"]) == tok(["the model"] * 2, add_special_tokens=False)["input_ids"]


def test_every_later_prompt_is_proven_by_a_window_not_assumed():
    """Without the window checks (every later prompt taken as the sample's ids), answers after one that starts with a
    newline would train on a prompt inference never produces: the equality above would fail."""
    tok, samples = samples_of("qwen2_5", seed=3, count=24)
    fast = SplitEncoder(tok).encode(samples, encode.text_pieces)
    reference = as_lists(encode._encode_reference(tok, samples))
    assumed = as_lists([encode._assemble(parts, [None] * len(later)) for parts, later in fast])
    assert assumed != reference


def metaspace_tokenizer():
    """A SentencePiece-style tokenizer (Metaspace, prepend_scheme "first"): only the text at the start of the input
    gets the '▁' marker, so a split tokenized on its own is not tokenized as it is inside the input."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("abcdefghijklmnopqrstuvwxyz\n ▁"))
    vocab = {c: i for i, c in enumerate(chars)} | {"▁u": len(chars), "▁a": len(chars) + 1}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "u"), ("▁", "a")]))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def test_a_tokenizer_that_marks_the_start_of_the_input_takes_the_reference_path():
    tok = metaspace_tokenizer()
    assert not factorizes(tok)
    messages = [U("hi"), A("a b"), U("hey"), A("ok")]
    samples = render_conversation(make_renderer(tok), messages, ["<|im_end|>"])
    reference = as_lists(encode._encode_reference(tok, samples))
    assert as_lists(encode.encode_samples(tok, samples)) == reference
    # what the gate prevents: tokenized split by split, the first split loses its marker
    forced = SplitEncoder(tok).encode(samples, encode.text_pieces)
    assert as_lists([encode._assemble(parts, later) for parts, later in forced]) != reference


@pytest.mark.parametrize("flag", ["lstrip", "rstrip", "single_word"])
def test_added_tokens_that_swallow_neighbours_take_the_reference_path(flag):
    from tokenizers import AddedToken

    tok, _ = tokenizer("qwen2_5")
    assert factorizes(tok)
    tok.add_tokens([AddedToken("<|tool|>", special=True, **{flag: True})])
    assert not factorizes(tok)


def test_a_tokenizer_that_cuts_otherwise_than_expected_is_caught_on_one_sample(capsys):
    """The guard: were the fast path wrong for a tokenizer that passes `factorizes`, the batch is encoded the
    reference way, with a note. Simulated by an encoder whose later prompts all claim to be exact."""
    tok, samples = samples_of("qwen2_5", seed=3, count=24)

    class Assuming(SplitEncoder):
        def encode(self, samples, pieces_of):
            return [(parts, [None] * len(later)) for parts, later in super().encode(samples, pieces_of)]

    wrong = as_lists(encode.encode_samples(tok, samples, Assuming(tok)))
    assert wrong == as_lists(encode._encode_reference(tok, samples))
    assert "encoded the slower reference way" in capsys.readouterr().err


@pytest.mark.parametrize("counted", [True, False], ids=["split-counter", "offsets"])
def test_a_prompt_of_few_characters_and_many_tokens_fills_the_limit(counted):
    """Rare characters take 3 tokens each: 60 characters fill a 128-token limit. The byte test that spares short
    prompts any tokenization must count bytes (4 per character here), not characters."""
    from chattune.data.template import PromptLimit

    tok, _ = tokenizer("qwen2_5")
    rare = "".join(chr(0x20000 + k) for k in range(60))
    prompt = f"<|im_start|>user\n{rare}<|im_end|>\n<|im_start|>assistant\n"
    tokens = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert len(prompt) + 1 < 128 <= tokens
    limit = PromptLimit(tok, 128, SplitEncoder(tok).count if counted else None)
    fills = limit.bind(prompt + "an answer<|im_end|>\n")
    assert fills(prompt) and not fills(prompt[:20])
    assert SplitEncoder(tok).count(prompt) == tokens


# ------------------------------------------------------------------------------------------------------------------
# Histories rendered from the conversation prepared once (chattune.data.hf) against apply_chat_template
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_prefix_renders_equal_apply_chat_template_on_every_published_template_and_case():
    from test_real_templates import CASES

    checked, built = 0, {}
    for family, messages, tools, kwargs in CASES:
        if family not in built:  # read only here: one build per family (35 cases, ~1 s per build)
            built[family] = tokenizer(family)[0]
        tok = built[family]
        render = make_renderer(tok, kwargs)
        assert render.prefixes is not None
        prefix = render.prefixes(messages, tools or ())
        for k in range(1, len(messages) + 1):
            for generation in (False, True):
                expected = outcome(lambda: tok.apply_chat_template(messages[:k], tools=tools, tokenize=False,
                                                                   add_generation_prompt=generation, **kwargs))
                assert outcome(lambda: prefix(k, generation)) == expected, (family, k, generation)
                checked += isinstance(expected, str)
    assert checked > 300


def outcome(call):
    """The text, or the error a template raises (some refuse a history without a user query)."""
    try:
        return call()
    except Exception as e:  # noqa: BLE001
        return (type(e).__name__, str(e))


def test_a_prefix_renderer_that_differs_is_caught_on_the_first_conversation_and_turned_off(capsys):
    tok, _ = tokenizer("qwen2_5")
    stops = setup_chat_template(tok, "auto").stop_tokens
    messages = [U("Hi"), A("Hello!"), U("2+2?"), A("4.")]
    expected = render_conversation(make_renderer(tok), messages, stops)
    render = make_renderer(tok)
    right = render.prefixes
    render.prefixes = lambda msgs, tools: (lambda k, generation: right(msgs, tools)(k, generation) + " ")
    samples = render_conversation(render, messages, stops, check=True)
    assert [(s.text, s.spans) for s in samples] == [(s.text, s.spans) for s in expected]
    assert render.prefixes is None and "using apply_chat_template" in capsys.readouterr().err


def test_prefix_renders_prepare_messages_as_apply_chat_template_does():
    """Fields set to None are dropped, and reasoning is also passed as `thinking` (gpt-oss templates read that)."""
    from fixtures import qwen_tokenizer

    tok = qwen_tokenizer("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.thinking }}|{{ m.content }}"
                         "{% if m.name is defined %}({{ m.name }}){% endif %}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    messages = [U("q"), A("a", reasoning_content="because", name=None), U("r")]
    prefix = make_renderer(tok).prefixes(messages, ())
    for k in (1, 2, 3):
        assert prefix(k, True) == tok.apply_chat_template(messages[:k], add_generation_prompt=True, tokenize=False)
    assert "because|a" in prefix(2, False) and "(None)" not in prefix(2, False)


@pytest.mark.parametrize("kwargs", [{}, {"greeting": "hey"}, {"messages": []}, {"add_generation_prompt": True}])
def test_prefix_renders_see_the_templates_globals_and_variables_as_apply_chat_template_does(kwargs):
    """Histories are rendered with the template's globals flattened once (chattune.data.hf): the globals
    (raise_exception, strftime_now), the special tokens and --template_kwargs reach the template as they do through
    apply_chat_template, and a variable named like one of their arguments fails (a TypeError either way)."""
    from fixtures import qwen_tokenizer

    tok = qwen_tokenizer("{{ bos_token }}{{ eos_token }}{{ greeting | default('-') }}{{ strftime_now('%Y')[:2] }}"
                         "{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}"
                         "{% if messages | length > 2 %}{{ raise_exception('too long: ' ~ messages | length) }}"
                         "{% endif %}{% if add_generation_prompt %}>{% endif %}")
    messages = [U("q"), A("a"), U("r")]
    prefix = make_renderer(tok, kwargs).prefixes(messages, ())
    clash = bool(kwargs) and "greeting" not in kwargs
    for k in (1, 2, 3):
        for generation in (False, True):
            expected = outcome(lambda: tok.apply_chat_template(messages[:k], add_generation_prompt=generation,
                                                               tokenize=False, **kwargs))
            got = outcome(lambda: prefix(k, generation))
            if clash:  # the messages name the function that refuses the argument
                assert got[0] == expected[0] == "TypeError", (k, generation)
            else:
                assert got == expected, (k, generation)
    if not clash:
        assert outcome(lambda: prefix(3, False))[1].endswith("too long: 3")  # the template's own error


def test_the_prefix_renderers_template_is_compiled_once_per_process_as_transformers_compiles_it():
    """Each chunk of data gets a new renderer; the template in the remembering sandbox is compiled once per source
    (~20 ms), and again only when transformers compiles the source again."""
    from fixtures import qwen_tokenizer
    from transformers.utils.chat_template_utils import _compile_jinja_template

    tok = qwen_tokenizer("{% for m in messages %}[{{ m.role }}|{{ m.content }}]{% endfor %}once per process")
    messages = [U("q"), A("a")]

    def template_of(prefix):
        return next(c.cell_contents for c in prefix.__closure__ if type(c.cell_contents).__name__ == "Template")

    first = template_of(make_renderer(tok).prefixes(messages, ()))
    assert template_of(make_renderer(tok).prefixes(messages, ())) is first
    _compile_jinja_template.cache_clear()
    prefix = make_renderer(tok).prefixes(messages, ())
    assert template_of(prefix) is not first
    assert prefix(2, False) == tok.apply_chat_template(messages, tokenize=False)


@pytest.mark.parametrize("hostile", ["{{ messages.append(1) }}", "{{ messages[0].content.__class__.__mro__ }}",
                                     "{{ messages[0].update(role='x') }}", "{{ ''.format.__globals__ }}",
                                     "{{ messages.pop() }}{{ messages.pop() }}", "{{ messages[0].clear() }}",
                                     "{{ messages[0].nope }}{{ messages[0].items() | list }}{{ messages[0].role }}"])
def test_the_prefix_renderers_sandbox_refuses_what_apply_chat_templates_refuses(hostile):
    """The prefix renderer's sandbox remembers its verdicts on plain values' attributes (chattune.data.hf): a
    template from a model repository still cannot mutate the conversation or reach Python's internals, on the first
    access or the tenth."""
    from fixtures import qwen_tokenizer

    from chattune.data.hf import RememberingSandbox

    source = ("{% for m in messages %}{{ m.content.strip() }}{{ m.content.startswith('H') }}{% endfor %}" + hostile
              + "{% for m in messages %}{{ m.role }}{% endfor %}")
    tok = qwen_tokenizer(source)
    messages = [U(" Hi "), A("Hello")]
    prefix = make_renderer(tok).prefixes(messages, ())
    for _ in range(10):
        expected = outcome(lambda: tok.apply_chat_template(messages, tokenize=False))
        assert outcome(lambda: prefix(2, False)) == expected
    assert messages == [U(" Hi "), A("Hello")]  # nothing changed
    env = prefix.__closure__  # the template the renderer uses runs in the remembering sandbox
    compiled = next(c.cell_contents for c in env if type(c.cell_contents).__name__ == "Template")
    assert isinstance(compiled.environment, RememberingSandbox) and compiled.environment.verdicts
