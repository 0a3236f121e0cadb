"""Token-exact prompts with the published chat templates of the families we support (tests/templates/, sources in
SOURCES.md): for every trained turn, the ids before its first trained token are exactly
apply_chat_template(history, add_generation_prompt=True, tokenize=True), and the answer is tokenized as its own
continuation, through its end-of-turn token. The reference is computed here from apply_chat_template alone."""

from pathlib import Path

import pytest
from fixtures import GLM_SPECIALS, deepseek_tokenizer, qwen_tokenizer

from chattune.data.chat_templates import setup_chat_template
from chattune.data.encode import encode_samples
from chattune.data.template import make_renderer, render_conversation
from chattune.errors import TemplateError

TEMPLATES = Path(__file__).resolve().parent / "templates"
QWEN_EXTRA = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>")
LLAMA_SPECIALS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
                  "<|python_tag|>")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def tokenizer(family):
    """A real vocabulary with the family's special tokens and its published template (Llama and GLM-4 borrow Qwen's
    BPE: the template logic is theirs, the merges Qwen's)."""
    template = (TEMPLATES / f"{family}.jinja").read_text()
    if family.startswith("qwen"):
        return qwen_tokenizer(template, extra_specials=QWEN_EXTRA), []
    if family == "llama3_1":
        tok = qwen_tokenizer(template, extra_specials=LLAMA_SPECIALS)
        tok.bos_token, tok.eos_token = "<|begin_of_text|>", "<|eot_id|>"
        return tok, ["<|eom_id|>"]
    if family == "glm4":
        tok = qwen_tokenizer(template, extra_specials=tuple(GLM_SPECIALS))
        tok.eos_token = "<|endoftext|>"
        return tok, ["<|user|>", "<|observation|>"]
    return deepseek_tokenizer(template), []


def U(text):
    return {"role": "user", "content": text}


def A(text, **kw):
    return {"role": "assistant", "content": text, **kw}


CALL = A("", tool_calls=[{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}])
RESULT = {"role": "tool", "name": "get_weather", "content": '{"sky": "rain"}'}
PLAIN = [{"role": "system", "content": "You are terse."}, U("Hi"), A("Hello!"), U("2+2?"), A("4.")]
NEWLINE_ANSWERS = [U("code?"), A("\ndef f():\n    return 1"), U("more?"), A("\n\nsure")]  # merge with "assistant\n"
TOOL_CALLING = [U("Umbrella in Paris?"), CALL, RESULT, A("Yes, it rains."), U("Thanks"), A("You're welcome.")]
REASONING = [U("2+2?"), A("4", reasoning_content="two plus two"), U("3+3?"),
             A("6", reasoning_content=""), U("and 4+4?"), A("\n8", reasoning_content="easy")]
SEARCH = {"type": "function", "function": {"name": "search", "description": "Search the web", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
    "required": ["query"]}}}
# Qwen3.5's XML tool calls: parallel calls, a multi-line string parameter, a non-string one, results after them
PARALLEL = [U("Weather in Paris and Oslo, then search."), A("", reasoning_content="two cities", tool_calls=[
    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]),
    {"role": "tool", "name": "get_weather", "content": "rain"}, {"role": "tool", "name": "get_weather",
                                                                  "content": "snow"},
    A("", tool_calls=[{"type": "function", "function": {"name": "search", "arguments": {
        "query": "umbrella\n  or coat?\nboth", "limit": 3}}}]),
    {"role": "tool", "name": "search", "content": "both"}, A("Rain in Paris, snow in Oslo: take both.")]


def agent_trajectory(queries: int, steps: int) -> list[dict]:
    """An agent's conversation: each user query answered after `steps` tool calls, every step with reasoning."""
    messages = []
    for q in range(queries):
        messages.append(U(f"Question {q}: what is the weather in city {q}?"))
        for s in range(steps):
            messages.append(A("", reasoning_content=f"step {s} of question {q}: I should look it up again",
                              tool_calls=[{"type": "function", "function": {"name": "get_weather",
                                                                            "arguments": {"city": f"City {q}-{s}"}}}]))
            messages.append({"role": "tool", "name": "get_weather", "content": f"sunny, {20 + s} degrees"})
        messages.append(A(f"It is sunny in city {q}.", reasoning_content=f"done with question {q}"))
    return messages

CASES = [
    ("qwen2_5", PLAIN, None, {}), ("qwen2_5", NEWLINE_ANSWERS, None, {}), ("qwen2_5", TOOL_CALLING, [WEATHER], {}),
    ("qwen3", PLAIN, None, {}), ("qwen3", TOOL_CALLING, [WEATHER], {}), ("qwen3", REASONING, None, {}),
    ("qwen3", NEWLINE_ANSWERS, None, {"enable_thinking": False}),
    ("qwen3_thinking_2507", REASONING, None, {}), ("qwen3_thinking_2507", PLAIN, None, {}),
    ("llama3_1", PLAIN, None, {}), ("llama3_1", TOOL_CALLING, [WEATHER], {"date_string": "25 Nov 2026"}),
    ("deepseek_llm", PLAIN, None, {}), ("deepseek_llm", NEWLINE_ANSWERS, None, {}),
    ("glm4", PLAIN, None, {}), ("glm4", NEWLINE_ANSWERS, None, {}),
    # today's Qwen (tests/templates/SOURCES.md): XML tool calls, thinking on and off, preserved or dropped history
    ("qwen3_5", PLAIN, None, {}), ("qwen3_5", REASONING, None, {}), ("qwen3_5", TOOL_CALLING, [WEATHER], {}),
    ("qwen3_5", PARALLEL, [WEATHER, SEARCH], {}), ("qwen3_5", NEWLINE_ANSWERS, None, {"enable_thinking": False}),
    ("qwen3_5", agent_trajectory(3, 2), [WEATHER], {}), ("qwen3_5", [U("2+2?"), A("4", reasoning_content="")], None,
                                                         {}),
    ("qwen3_5_nothink", PLAIN, None, {}), ("qwen3_5_nothink", TOOL_CALLING, [WEATHER], {}),
    ("qwen3_5_nothink", REASONING, None, {"enable_thinking": True}),
    ("qwen3_6", REASONING, None, {}), ("qwen3_6", REASONING, None, {"preserve_thinking": True}),
    ("qwen3_6", PARALLEL, [WEATHER, SEARCH], {}), ("qwen3_6", agent_trajectory(2, 2), [WEATHER],
                                                  {"preserve_thinking": True}),
    ("qwen3_8", REASONING, None, {}), ("qwen3_8", REASONING, None, {"preserve_thinking": False}),
    ("qwen3_8", PARALLEL, [WEATHER, SEARCH], {"reasoning_effort": "low"}),
    ("qwen3_8", PLAIN, None, {"reasoning_effort": "medium"}), ("qwen3_8", TOOL_CALLING, [WEATHER],
                                                               {"reasoning_effort": "xhigh"}),
    ("qwen3_8", NEWLINE_ANSWERS, None, {"enable_thinking": False}),
]


def reference(tok, messages, tools, stops, kwargs):
    """(prompt ids, answer ids) of every assistant turn, from apply_chat_template: the prompt tokenized as inference
    does; the answer = the rendered turn after that prompt, trailing whitespace left out, tokenized on its own, with
    the end-of-turn token that follows it where the template closes a turn with the next role token (GLM) or the eos
    where it leaves the last turn open."""
    pairs = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt_text = tok.apply_chat_template(messages[:i], tools=tools, add_generation_prompt=True, tokenize=False,
                                              **kwargs)
        prompt = tok.apply_chat_template(messages[:i], tools=tools, add_generation_prompt=True, tokenize=True,
                                         return_dict=True, **kwargs)["input_ids"]
        upto = tok.apply_chat_template(messages[: i + 1], tools=tools, tokenize=False, **kwargs)
        answer = upto[len(prompt_text):].rstrip()
        if not any(answer.endswith(s) for s in stops):
            later = tok.apply_chat_template(messages, tools=tools, tokenize=False, **kwargs)[len(upto.rstrip()):]
            answer += next((s for s in stops if later.lstrip().startswith(s)), stops[0])
        pairs.append((prompt, tok(answer, add_special_tokens=False)["input_ids"]))
    return pairs


def trained_runs(encodings):
    """(ids before the run, the run) for every run of consecutive trained tokens of every encoding."""
    runs = []
    for ids, labels in encodings:
        ids, labels = ids.tolist(), labels.tolist()
        k = 0
        while k < len(ids):
            if labels[k] == -100:
                k += 1
                continue
            end = k
            while end < len(ids) and labels[end] != -100:
                end += 1
            runs.append((ids[:k], ids[k:end]))
            k = end
    return runs


@pytest.mark.parametrize("family, messages, tools, kwargs", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_every_trained_turn_has_the_exact_inference_prompt_and_its_own_answer_tokens(family, messages, tools, kwargs):
    tok, extra_stops = tokenizer(family)
    setup = setup_chat_template(tok, "auto", extra_stops)
    samples = render_conversation(make_renderer(tok, kwargs), messages, setup.stop_tokens, tools=tools or ())
    encodings = [pair for encoded in encode_samples(tok, samples) for pair in encoded]
    assert sorted(trained_runs(encodings)) == sorted(reference(tok, messages, tools, setup.stop_tokens, kwargs))


def test_an_answer_that_merges_with_its_prompt_is_trained_on_the_inference_prompt():
    """Qwen3-2507's generation prompt ends '<think>\\n'; an empty reasoning block renders '<think>\\n\\n</think>',
    and whole-text tokenization merges the two newlines into one token that inference never produces."""
    tok, _ = tokenizer("qwen3_thinking_2507")
    setup = setup_chat_template(tok, "auto")
    messages = [U("3+3?"), A("6", reasoning_content="")]
    [sample] = render_conversation(make_renderer(tok), messages, setup.stop_tokens)
    [[(ids, labels)]] = encode_samples(tok, [sample])
    whole = tok(sample.text, add_special_tokens=False)["input_ids"]
    assert ids.tolist() != whole  # the conversation tokenized at once has the merged token
    prompt = tok.apply_chat_template(messages[:1], add_generation_prompt=True, return_dict=True)["input_ids"]
    first = int((labels != -100).argmax())
    assert ids[:first].tolist() == prompt and tok.convert_ids_to_tokens(prompt[-1]) == "Ċ"


def test_a_later_turn_whose_prompt_tokenizes_differently_trains_on_its_own():
    """The first answer starts with a newline: inside the conversation it is tokenized on its own, but the second
    turn's inference prompt (the history tokenized at once) merges it; the second turn becomes its own sample."""
    tok, _ = tokenizer("qwen2_5")
    setup = setup_chat_template(tok, "auto")
    samples = render_conversation(make_renderer(tok), NEWLINE_ANSWERS, setup.stop_tokens)
    [encodings] = encode_samples(tok, samples)
    assert len(encodings) == 2  # the conversation, then the second turn on its own
    runs = trained_runs(encodings)
    assert len(runs) == 2 and runs[1][0] == tok.apply_chat_template(
        NEWLINE_ANSWERS[:3], add_generation_prompt=True, return_dict=True)["input_ids"]


@pytest.mark.parametrize("family", ["deepseek_llm", "glm4"])
def test_templates_without_tool_support_are_refused(family):
    tok, extra_stops = tokenizer(family)
    setup = setup_chat_template(tok, "auto", extra_stops)
    with pytest.raises(TemplateError, match="does not render them|renders no tool calls"):
        render_conversation(make_renderer(tok), TOOL_CALLING, setup.stop_tokens, tools=[WEATHER], source="d: line 3")


# ------------------------------------------------------------------------------------------------------------------
# Long conversations: the work is bounded by --model_max_length, and the kept tokens are the same as without bound
# ------------------------------------------------------------------------------------------------------------------

LONG_CASES = [
    ("qwen2_5", PLAIN[1:] * 12, None, {}), ("qwen2_5", NEWLINE_ANSWERS * 10, None, {}),
    ("qwen2_5", TOOL_CALLING * 6, [WEATHER], {}), ("qwen3", PLAIN[1:] * 12, None, {}),
    ("qwen3", REASONING * 6, None, {}), ("qwen3", [*REASONING[:-1], A("8")] * 6, None, {}),
    ("qwen3_thinking_2507", PLAIN[1:] * 12, None, {}), ("llama3_1", PLAIN * 10, None, {}),
    ("deepseek_llm", PLAIN[1:] * 12, None, {}), ("glm4", PLAIN[1:] * 12, None, {}),
]


def encode_one(tok, stops, messages, tools, kwargs, max_length, bound, render_calls=None):
    from chattune.data import encode
    from chattune.data.records import Conversation
    from chattune.data.report import report_of

    job = encode.EncodeJob([Conversation(tuple(messages), "long.jsonl: record 1", "messages", tuple(tools or ()))], tok,
                       kwargs, list(stops), max_length, bound_turns=bound)
    encoded = encode.encode_conversations((0, 1), job)
    return encode.kept_arrays(encoded), report_of(encoded, max_length, 1, [], 0)


@pytest.mark.parametrize("family, messages, tools, kwargs", LONG_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(LONG_CASES)])
@pytest.mark.slow
def test_turns_past_the_length_limit_are_not_rendered_and_the_kept_tokens_are_the_same(family, messages, tools,
                                                                                       kwargs):
    """At every limit across the conversation's length: the kept ids and labels, the token counts and the cut tokens
    are those of rendering every turn; the turns not rendered are counted, never lost."""
    tok, extra_stops = tokenizer(family)
    stops = setup_chat_template(tok, "auto", extra_stops).stop_tokens
    whole = len(tok.apply_chat_template(messages, tools=tools, return_dict=True, **kwargs)["input_ids"])
    # prompt lengths of some turns: a limit that keeps exactly the first answer token of a turn, or none of it
    prompts = [len(tok.apply_chat_template(messages[:i], tools=tools, add_generation_prompt=True, return_dict=True,
                                           **kwargs)["input_ids"])
               for i, m in enumerate(messages) if m["role"] == "assistant"][2::3]
    limits = {*range(16, whole + 40, max(1, whole // 12)), whole - 1, whole, whole + 1}
    limits |= {n + d for n in prompts for d in (0, 1)}
    skipped_somewhere = False
    for max_length in sorted(limits):
        bounded, report = encode_one(tok, stops, messages, tools, kwargs, max_length, bound=True)
        every, full = encode_one(tok, stops, messages, tools, kwargs, max_length, bound=False)
        for key in every:
            assert bounded[key].tolist() == every[key].tolist(), (key, max_length)
        assert (report.kept, report.tokens, report.trained_tokens, report.truncated) == (
            full.kept, full.tokens, full.trained_tokens, full.truncated), max_length
        # The cut tail is tokenized without the boundaries of the turns not rendered (and without the eos a template
        # that leaves the last turn open gets appended): a few tokens apart at most
        assert abs(report.truncated_tokens - full.truncated_tokens) <= max(2, 0.1 * full.truncated_tokens), max_length
        assert report.trained_turns + report.beyond_limit_turns == full.trained_turns, max_length
        assert full.beyond_limit_turns == 0
        skipped_somewhere |= report.beyond_limit_turns > 0
    assert skipped_somewhere  # the bound was exercised (Qwen3's turns train on their own, and are bounded too)


@pytest.mark.slow
def test_a_ten_thousand_turn_record_renders_only_what_fits(monkeypatch):
    """The issue's 10,000-turn record took 295 s: every turn's history was rendered. Now the rendering stops at the
    first turn whose prompt fills the limit: a bounded number of renders, and the rest counted in the report."""
    from chattune.data import encode as prepare

    tok, _ = tokenizer("qwen2_5")
    stops = setup_chat_template(tok, "auto").stop_tokens
    calls = []
    make = prepare.make_renderer

    def counting(*args, **kw):
        render = make(*args, **kw)

        def wrapped(messages, *rest, **more):
            calls.append(len(messages))
            return render(messages, *rest, **more)
        return wrapped

    monkeypatch.setattr(prepare, "make_renderer", counting)
    messages = [m for i in range(10_000) for m in (U(f"question {i}: what is {i}+{i}?"), A(f"It is {2 * i}."))]
    kept, report = encode_one(tok, stops, messages, None, {}, 512, bound=True)
    assert report.trained_turns + report.beyond_limit_turns == 10_000
    assert 10 < report.trained_turns < 40 and report.tokens == 512 and report.truncated == 1
    # the whole text, the generation prompt once, two renders per turn up to the limit and the prompt that fills it
    assert len(calls) == 2 * report.trained_turns + 3
    assert calls[0] == len(messages) and sum(calls[1:]) < 2_000  # beyond the whole text: the first turns' histories
    assert f"{report.beyond_limit_turns:,} assistant turns start after 512 tokens" in report.format()


def test_a_template_that_drops_old_history_is_rendered_turn_by_turn():
    """A template that elides answers older than the last five messages renders a prompt full of a long early
    answer, and later prompts without it: those later turns do train, so the history check must stop the bound."""
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n"
                "{% if m.role == 'assistant' and loop.index0 < messages|length - 5 %}(earlier){% else %}"
                "{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = qwen_tokenizer(template)
    long = A(" ".join(f"word{k}" for k in range(400)))
    messages = [U("Hi"), long, *[m for k in range(12) for m in (U(f"q{k}"), A(f"a{k}"))], U("last"), long]
    stops = setup_chat_template(tok, "auto").stop_tokens
    bounded, report = encode_one(tok, stops, messages, None, {}, 128, bound=True)
    every, full = encode_one(tok, stops, messages, None, {}, 128, bound=False)
    assert report.beyond_limit_turns == 0 and report.trained_turns == full.trained_turns == 14
    assert {k: v.tolist() for k, v in bounded.items()} == {k: v.tolist() for k, v in every.items()}
    assert report.kept == full.kept >= 5  # the short turns long after the long answer train on their own


def test_an_agent_trajectory_trains_one_sample_per_user_query():
    """Qwen3.5 drops the reasoning of answers before the last user query, so every turn of an earlier query renders
    differently in the whole conversation. Each query's tool steps and answer render prefix-stably among
    themselves: one sample per query, not one per step. 8 queries of 3 tool steps and an answer: at most a third
    of the tokens a sample per assistant turn processes, with exactly the same trained tokens (every turn's prompt
    still the inference prompt: the token-exact test above runs the same template on trajectories)."""
    tok, _ = tokenizer("qwen3_5")
    setup = setup_chat_template(tok, "auto")
    render = make_renderer(tok)
    messages = agent_trajectory(8, 3)
    samples = render_conversation(render, messages, setup.stop_tokens, tools=[WEATHER])
    assert len(samples) == 8  # the whole conversation (its last query) and one per earlier query
    encodings = [pair for encoded in encode_samples(tok, samples) for pair in encoded]
    processed = sum(len(ids) for ids, _ in encodings)
    trained = sorted(trained_runs(encodings))
    assert trained == sorted(reference(tok, messages, [WEATHER], setup.stop_tokens, {}))
    whole = render(messages, False, [WEATHER])
    per_turn = len(tok(whole, add_special_tokens=False)["input_ids"]) + sum(
        len(tok(upto, add_special_tokens=False)["input_ids"])
        for i, m in enumerate(messages) if m["role"] == "assistant"
        and not whole.startswith(upto := render(messages[:i + 1], False, [WEATHER])))
    assert processed * 3 <= per_turn, (processed, per_turn)
