"""Thin wrapper over a Hugging Face tokenizer: text <-> ids and the chat template."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

from cachedattention.errors import InvalidRequest
from cachedattention.model.chat_template import resolve_chat_template
from cachedattention.model.content_format import CONTENT_FORMATS, as_parts, as_string, detect_content_format
from cachedattention.model.messages import ChatOptions
from cachedattention.store.session import common_prefix

log = logging.getLogger(__name__)
# what a Jinja template raises while it runs on what it was given (jinja2's own errors are answered apart)
RENDER_ERRORS = (TypeError, AttributeError, KeyError, IndexError, ZeroDivisionError, OverflowError, RecursionError,
                 MemoryError)  # e.g. a request's own template building a huge string

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback


class Kept(NamedTuple):
    """What a session's context-overflow truncation keeps of a rendered chat prompt, and where it may cut."""

    head: int  # its first tokens: the system prompt, through the first user message's header
    tail: int  # its last tokens: the newest turn, from its first message's content
    turn_starts: tuple[int, ...] = ()  # where its user messages' contents start, the tail's included


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE (GPT-2's) writes each byte as one printable character: character -> byte."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    out, shifted = {}, 0
    for b in range(256):
        if b in printable:
            out[chr(b)] = b
        else:
            out[chr(256 + shifted)] = b
            shifted += 1
    return out


def _decodes_byte_level(hf_tokenizer: Any) -> bool:
    """Whether the tokenizer's decoder (or one in its sequence) is byte-level BPE's."""
    decoder = _decoder_json(getattr(hf_tokenizer, "backend_tokenizer", None))
    parts = (decoder.get("decoders") or []) if decoder.get("type") == "Sequence" else [decoder]
    return any(isinstance(d, dict) and d.get("type") == "ByteLevel" for d in parts)


def _decoder_json(backend: Any) -> dict:
    """A `tokenizers` backend's decoder as its JSON ({} where it has none): the decoder's pickled state,
    else the whole tokenizer's JSON (which took ~0.25 s to write and read for 49,152 tokens)."""
    if getattr(backend, "decoder", None) is None:
        return {}
    try:
        decoder = json.loads(backend.decoder.__getstate__())
    except (ValueError, AttributeError, TypeError):
        try:
            decoder = json.loads(backend.to_str()).get("decoder")
        except (ValueError, AttributeError):
            return {}
    return decoder if isinstance(decoder, dict) else {}


class Tokenizer:
    def __init__(self, hf_tokenizer: Any, chat_template: str | None = None, content_format: str = "auto") -> None:
        if content_format not in CONTENT_FORMATS:
            raise ValueError(f"chat_template_content_format must be one of {', '.join(CONTENT_FORMATS)}, got "
                             f"{content_format!r}")  # fmt: skip
        self.hf = hf_tokenizer
        self.chat_template = chat_template  # a template that replaces the tokenizer's own (vLLM's --chat-template)
        # how a message's content reaches the template: one string, OpenAI's parts, or as it reads it (auto)
        self.content_format = content_format
        self._formats: dict[str, str] = {}  # auto's reading of each template rendered
        self._alphabet = _byte_level_alphabet() if _decodes_byte_level(hf_tokenizer) else None
        self._special = set(getattr(hf_tokenizer, "all_special_ids", ()) or ())
        # added tokens (special or not) are their text as written, not pieces of the vocabulary's alphabet
        added = getattr(hf_tokenizer, "added_tokens_decoder", None) or {}
        # decoding skips every added token marked special, not only those all_special_ids lists
        self._special |= {i for i, t in added.items() if getattr(t, "special", False)}
        self._added = {i: str(getattr(t, "content", t)) for i, t in added.items()}
        self._bytes: dict[int, bytes] = {}  # logprobs look the same tokens up again and again
        self._by_first_byte: dict[int, list[int]] | None = None

    @classmethod
    def from_pretrained(cls, path: str, **kwargs: Any) -> Tokenizer:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(path, **kwargs))

    def with_chat_template(self, template_or_file: str) -> Tokenizer:
        """The same tokenizer with another chat template, given as a Jinja template or the file that
        holds one, checked as transformers compiles it (the loaded model's is left as it is)."""
        return Tokenizer(self.hf, resolve_chat_template(template_or_file), self.content_format)

    def with_content_format(self, content_format: str) -> Tokenizer:
        """The same tokenizer and template, a message's content reaching the template as
        `content_format` says (vLLM's --chat-template-content-format: auto, string or openai)."""
        return self if content_format == self.content_format else Tokenizer(self.hf, self.chat_template, content_format)

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """The text's ids; add_special_tokens: with what the tokenizer adds around a text (Llama's
        BOS), as a plain prompt is encoded (a chat template writes its own)."""
        try:
            return list(self.hf.encode(text, add_special_tokens=add_special_tokens))
        except (TypeError, UnicodeError) as e:  # e.g. lone surrogates the tokenizer cannot take
            if isinstance(text, str) and any("\ud800" <= c <= "\udfff" for c in text):
                raise ValueError("the text holds a lone surrogate (not valid Unicode), which cannot be tokenized") from None
            raise ValueError(f"the text cannot be tokenized: {e}") from e

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def added_prefix(self, text: str, full: Sequence[int] | None = None) -> int:
        """How many tokens encoding `text` as a prompt (`full`, when already encoded) puts before the
        text's own (a BOS: 1)."""
        bare = self.encode(text)
        full = self.encode(text, add_special_tokens=True) if full is None else list(full)
        return next((k for k in range(len(full) - len(bare) + 1) if full[k : k + len(bare)] == bare), 0)

    def single_token_id(self, text: str) -> int | None:
        """The id of the one token that is exactly `text` (an added tag like <think>), else None."""
        ids = self.encode(text)
        return ids[0] if len(ids) == 1 and self.token_bytes(ids[0]) == text.encode() else None

    def pieces(self, ids: Sequence[int]) -> list[str]:
        """The vocabulary's own strings for the ids (byte-level "Ġworld", SentencePiece "▁world")."""
        return list(self.hf.convert_ids_to_tokens(list(ids)))

    def token_text(self, token_id: int) -> str:
        """One token's text, special tokens included (what logprobs show for it); a token holding
        part of a character shows U+FFFD, as in vLLM and OpenAI (its bytes say which part)."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes a token stands for (byte-level BPE, SentencePiece, added tokens)."""
        data = self._bytes.get(token_id)
        if data is None:
            data = self._bytes[token_id] = self._token_bytes(token_id)
        return data

    def tokens_by_first_byte(self) -> dict[int, list[int]]:
        """Token ids grouped by their first byte (special tokens left out), built once: guided
        decoding looks for the tokens that may come next among those starting with an allowed byte."""
        if self._by_first_byte is None:
            groups: dict[int, list[int]] = {}
            for t in range(len(self.hf)):
                data = self.token_bytes(t)
                if data and not self.is_special(t):
                    groups.setdefault(data[0], []).append(t)
            self._by_first_byte = groups
        return self._by_first_byte

    def first_token_length(self, token_id: int) -> int:
        """Characters a token adds when it starts a text (SentencePiece's decoder drops its space)."""
        return len(self.decode([token_id]))

    def _token_bytes(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode()
        piece = self.hf.convert_ids_to_tokens(token_id)
        if piece is None:
            return self.hf.decode([token_id]).encode()
        if self._alphabet is not None and all(c in self._alphabet for c in piece):
            return bytes(self._alphabet[c] for c in piece)
        m = _BYTE_PIECE.fullmatch(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        return piece.replace("\u2581", " ").encode()  # SentencePiece's word-start mark is a space

    def render_chat(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, tools: list | None = None,
        options: ChatOptions | None = None,
    ) -> str:  # fmt: skip
        """The chat template's text; `tools` (OpenAI's function definitions) go to templates that
        describe them to the model (others ignore them); `options` (when given, its
        add_generation_prompt counts): continue the last message, extra template variables."""
        if not self.chat_template and not getattr(self.hf, "chat_template", None) and not (options and options.template):
            raise ValueError("this model's tokenizer has no chat template; give one (--chat-template, "
                             "LLM(chat_template=...)) or use generate() with a plain prompt")  # fmt: skip
        if options is not None:
            options.check(messages)
        kwargs = options.render_kwargs() if options is not None else {"add_generation_prompt": add_generation_prompt}
        if options is not None and options.template:  # rendered in transformers' sandbox, as the model's own
            kwargs["chat_template"] = options.template
        elif self.chat_template:
            kwargs["chat_template"] = self.chat_template
        import jinja2

        as_it_reads = as_parts if self._format(kwargs.get("chat_template")) == "openai" else _as_strings
        try:
            return self.hf.apply_chat_template(as_it_reads(messages), tools=tools or None, tokenize=False, **kwargs)
        except jinja2.TemplateError as e:  # the template's own refusal (raise_exception, role order) or a missing value
            raise InvalidRequest(f"the chat template rejected the messages: {e}", "messages") from None
        except RENDER_ERRORS as e:  # the template failed at run time: a 400 that says why, not a 500
            if options is not None and options.template_kwargs:  # a variable of the wrong kind, absurdly nested
                raise InvalidRequest(f"the chat template cannot be rendered with these chat_template_kwargs: {e}",
                                     "chat_template_kwargs") from None  # fmt: skip
            raise InvalidRequest(f"the chat template failed to render these messages: {type(e).__name__}: {e}",
                                 "messages") from None  # fmt: skip

    def _format(self, template: str | None) -> str:
        """How the template in use reads a message's content: as set, or as auto reads the template."""
        if self.content_format != "auto":
            return self.content_format
        template = template or getattr(self.hf, "chat_template", None)
        if isinstance(template, dict):  # (named templates: the default one renders a chat)
            template = template.get("default")
        if not isinstance(template, str):
            return "string"
        if template not in self._formats:
            self._formats[template] = detect_content_format(template)
        return self._formats[template]

    def head_length(
        self, messages: Sequence[dict[str, Any]], prompt: Sequence[int], tools: list | None = None,
        options: ChatOptions | None = None,
    ) -> int:  # fmt: skip
        """Tokens of the rendered prompt that come before the first non-system message's content:
        the system prompt (given or the template's default, with any tools) that context truncation
        keeps, and the first message's header (a user's), so that what follows a cut reads as a
        user message, and one whole when truncation dropped all the history before the newest."""
        history = [messages[0]] if messages and messages[0]["role"] == "system" else []
        start = self._leaving(history, prompt, tools, _plain(options))
        return 0 if start is None else start  # (a template refusing it: truncation keeps no head)

    def kept_lengths(
        self, messages: Sequence[dict[str, Any]], prompt: Sequence[int], tools: list | None = None,
        options: ChatOptions | None = None,
    ) -> Kept:  # fmt: skip
        """What a session's context-overflow truncation keeps of the rendered prompt: its head (the
        system prompt, `head_length`: through the first message's header) and its tail, the newest
        turn (from the content of the first message after the last answer before the last user
        message: that message, tool calls and results after it, the generation prompt; a continued
        final answer too; an assistant message calling tools is no answer), and where a cut of the
        history between may end: the starts of its user messages' contents (`user_starts`), so that
        the head and what follows read as a conversation. A newest turn too long for the window is
        refused (as vLLM refuses a prompt past it), not served cut."""
        head = self.head_length(messages, prompt, tools, options)
        answered = len(messages) - 1 if options is not None and options.continue_final_message else len(messages)
        query = max((i for i in range(answered) if messages[i]["role"] == "user"), default=0)
        last = max((i for i in range(query) if messages[i]["role"] == "assistant" and not messages[i].get("tool_calls")),
                   default=None)  # fmt: skip
        if last is None:  # a first turn: all of it after the head is new
            return Kept(head, len(prompt) - head)
        tail, header = self._newest_turn(messages[last + 1 :], prompt, head, tools, options)
        if tail is None:  # where the prompt leaves its own history
            start = self._leaving(list(messages[: last + 1]), prompt, tools, _plain(options))
            tail = len(prompt) - max(start, head) if start is not None else 0
        newest = len(prompt) - tail
        first = next(i for i, m in enumerate(messages) if m["role"] != "system")
        if not (messages[last + 1]["role"] == "user" and head < newest < len(prompt) and messages[first]["role"] == "user"):
            return Kept(head, tail)
        # the user header: learnt from the stand-in conversation (no longer than the newest turn's own:
        # a coincidence of texts before them is not taken for it), else what the head and the newest turn end with
        header = common_suffix(header, prompt[:newest]) if len(header) >= 2 else common_suffix(prompt[:head], prompt[:newest])
        users = [m.get("content") for m in messages[first + 1 : last + 1] if m["role"] == "user"]
        lone = len(header) == 1 and self.is_special(header[0])  # (Mistral's [INST]: no word of a text)
        return Kept(head, tail, self._user_messages(prompt, user_starts(prompt, header, head, newest, lone), users))

    def _user_messages(self, prompt: Sequence[int], starts: Sequence[int], users: list[Any]) -> tuple[int, ...]:
        """Of the places after a user header (the newest turn's last), those where the history's user
        messages (`users`, their contents) start, in order: a template may write a tool's result
        under a user header (Qwen's), a message may hold one. () unless each is found: a cut at a token."""
        found: list[int] = []
        for start in starts[:-1]:
            if len(found) < len(users) and self._starts_with(prompt, start, users[len(found)]):
                found.append(start)
        return (*found, starts[-1]) if starts and len(found) == len(users) else ()

    def _starts_with(self, prompt: Sequence[int], start: int, content: Any) -> bool:
        """Whether the prompt's text from `start` begins with `content` (its first characters)."""
        if not isinstance(content, str):
            return False
        text = self.decode(prompt[start : start + 16], skip_special_tokens=False).rstrip("\ufffd").lstrip()
        n = min(len(text), len(content.lstrip()), 24)
        return text[:n] == content.lstrip()[:n]

    def _newest_turn(self, turn: Sequence[dict[str, Any]], prompt: Sequence[int], head: int, tools: list | None,
                     options: ChatOptions | None) -> tuple[int | None, list[int]]:  # fmt: skip
        """The tokens of the newest turn (its messages `turn`) at the prompt's end, found after a short
        stand-in history (a long conversation is not rendered twice), None if the prompt does not end
        with exactly those tokens; and the tokens that end both the stand-in's user header and the
        turn's (its first message a user's), [] if none."""
        # (an answer whose end no system prompt's is likely to share: the two user headers' common end is the header)
        stand_in = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        try:
            short = self.encode_chat([*stand_in, *turn], tools=tools, options=options)
            start = self._leaving(stand_in, short, tools, _plain(options))
            first = self._leaving([], short, tools, _plain(options)) if turn[0]["role"] == "user" else None
        except ValueError:  # (the template's refusal: a turn opening with tool results the stand-in did not call)
            return None, []
        header = common_suffix(short[:first], short[:start]) if first is not None and start is not None else []
        if start is not None and 0 < len(short) - start <= len(prompt) - head:
            if list(prompt[len(prompt) - len(short) + start :]) == short[start:]:
                return len(short) - start, header
        return None, header

    def _leaving(self, history: list[dict[str, Any]], ids: Sequence[int], tools: list | None,
                 plain: ChatOptions) -> int | None:  # fmt: skip
        """Where `ids` (a rendering of `history` and more) leave `history` followed by a stand-in user
        message: at the next message's content, its header being the stand-in's. The stand-in also
        keeps the history's last answer rendered as in a longer conversation (Qwen3's template gives
        a final answer an empty <think> block). None if the template refuses it."""
        try:
            probe = self.encode_chat([*history, {"role": "user", "content": "\x00"}], tools=tools, options=plain)
        except ValueError as e:  # (the template's refusal)
            log.info("the chat template cannot render the history with a stand-in message (%s)", e)
            return None
        return common_prefix(probe, ids)

    def encode_chat(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, tools: list | None = None,
        options: ChatOptions | None = None,
    ) -> list[int]:  # fmt: skip
        specials = options is not None and options.add_special_tokens  # (vLLM's chat field: a BOS before the template's)
        return self.encode(self.render_chat(messages, add_generation_prompt, tools, options), add_special_tokens=specials)


def user_starts(prompt: Sequence[int], header: Sequence[int], head: int, newest: int,
                lone: bool = False) -> tuple[int, ...]:  # fmt: skip
    """Where the user messages' contents start in a chat prompt between its head and its newest
    turn's start (`newest`, one of them): after each run of `header`, the tokens every user
    message's header ends with. None for a header of fewer than two tokens (one may be a word of
    the text too), so a cut falls at a token, unless `lone`: a single special token that no text
    is written with (Mistral's [INST])."""
    header = list(header)
    if len(header) < (1 if lone else 2):
        return ()
    n, first = len(header), header[0]
    found = [i + n for i in range(head, newest - n) if prompt[i] == first and list(prompt[i : i + n]) == header]
    return (*found, newest)


def common_suffix(a: Sequence[int], b: Sequence[int], most: int = 32) -> list[int]:
    """The last tokens `a` and `b` share, at most `most`."""
    n = 0
    while n < min(len(a), len(b), most) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return list(a[len(a) - n :])


def _plain(options: ChatOptions | None) -> ChatOptions:
    """The request's template, its variables and documents, without a generation prompt: to render probes."""
    if options is None:
        return ChatOptions(False)
    # (its documents too: a template may write them in the head that truncation keeps; and the
    # tokenizer's BOS when the request adds it, so that probes and the prompt start alike)
    return ChatOptions(False, template_kwargs=options.template_kwargs, template=options.template,
                       documents=options.documents, add_special_tokens=options.add_special_tokens)  # fmt: skip


def _as_strings(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [as_string(m) for m in messages]
