"""Tool calls in a model's answer, in the format the server was started with (`--tool-call-parser`):

- `hermes` (Qwen2.5, Hermes 2 and 3, SmolLM3, ...): text, then one or more
  <tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks;
- `llama3_json` (Llama 3.1, 3.2, 3.3): an answer that is one or more JSON objects
  {"name": ..., "parameters": {...}}, separated by ";" (after the <|python_tag|> some write first);
- `mistral` (Mistral 7B v0.3, Mistral Nemo, Small, ...): text, then [TOOL_CALLS] and a JSON array of
  {"name": ..., "arguments": {...}}; or, as the later ones write them, [TOOL_CALLS]NAME{...} (or
  NAME[ARGS]{...}) for each call. Their templates want call ids of 9 letters and digits.
- `granite` (Granite 3): an answer that is a JSON array of {"name", "arguments"}, <|tool_call|> before it or not;
- `phi4_mini_json` (Phi-4-mini): text, then functools and a JSON array of {"name", "arguments"};
- `qwen3_coder` (Qwen3-Coder): text, then <tool_call><function=NAME><parameter=KEY>VALUE</parameter>...
  </function></tool_call> blocks, each value typed by the request's function's parameters schema (a
  string as written, numbers, booleans, JSON objects and arrays);
- `pythonic` (Llama 3.2 and 4 with vLLM's pythonic template, ToolACE, ...): an answer that is a
  Python list of calls, [get_weather(city="Paris"), ...] (Llama 4 puts it between <|python_start|>
  and <|python_end|>); literal arguments only, JSON's true/false/null read as Python's;
- `openai` (gpt-oss): harmony messages to functions.NAME whose body is the arguments' JSON object
  (with --reasoning-parser openai_gptoss, which leaves them in the content as written).

Each parser gives the answer's text besides its calls, and how much of a streamed answer is plain
text for sure (the rest may still become a call, and waits).
"""

from __future__ import annotations

import ast
import json
import math
import re
import secrets
import string
import uuid
import warnings
from dataclasses import dataclass
from typing import Any

from cachedattention import harmony
from cachedattention.text_tags import tag_prefix_at_end

OPEN, CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
MISTRAL_TAG, MISTRAL_ARGS = "[TOOL_CALLS]", "[ARGS]"
PYTHON_START, PYTHON_END = "<|python_start|>", "<|python_end|>"
ID_CHARS = string.ascii_letters + string.digits


LONE_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text

    def __post_init__(self) -> None:
        # a model's JSON may escape a lone surrogate (\ud800): decoded, it cannot be sent as UTF-8 (the
        # answer was a 500); escaped again, the client's JSON parser still reads the value written
        object.__setattr__(self, "name", _escape_surrogates(self.name))
        object.__setattr__(self, "arguments", _escape_surrogates(self.arguments))

    def as_json(self, index: int | None = None) -> dict[str, Any]:
        """OpenAI's form; `index` for a streamed chunk's delta."""
        out: dict[str, Any] = {"id": self.id, "type": "function",
                               "function": {"name": self.name, "arguments": self.arguments}}  # fmt: skip
        return out if index is None else {"index": index, **out}


def _escape_surrogates(text: str) -> str:
    """Lone surrogates as JSON's \\uXXXX escapes (only a JSON string can hold one, so the arguments'
    JSON reads back the same)."""
    return LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _openai_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _mistral_id() -> str:
    return "".join(secrets.choice(ID_CHARS) for _ in range(9))


def _call(obj: Any, keys: tuple[str, ...], required: bool = False, new_id=_openai_id) -> ToolCall | None:
    """A call from a decoded JSON object with a name and its arguments under the first of `keys`
    it has (`required`: an object must be there, else it is no call: a JSON answer that only has a
    "name" is not one)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    key = next((k for k in keys if k in obj), None)
    if required and (key is None or not _is_object(obj[key])):
        return None
    args = (obj[key] if key is not None else None) or {}
    args_text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return ToolCall(new_id(), obj["name"], args_text)


def _is_object(value: Any) -> bool:
    """A call's arguments: a JSON object, or its text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return False
    return isinstance(value, dict)


def _text_before(text: str, tag: str) -> int:
    """Up to the first `tag`, less a tail that may still grow into one."""
    i = text.find(tag)
    return i if i >= 0 else len(text) - tag_prefix_at_end(text, tag)


class HermesCalls:
    """<tool_call> blocks after the answer's text."""

    name = "hermes"

    @staticmethod
    def parse(text: str) -> tuple[str | None, list[ToolCall]]:
        """The answer's text before its tool calls (None when there is none, as vLLM; whitespace stays,
        as it streams) and the calls. A block that is not a JSON object with a name (or a model that
        only talks about <tool_call>) leaves the whole answer as text, as vLLM's parser does. The
        last block may lack its closing tag (a model that stops right after the JSON)."""
        start = text.find(OPEN)
        if start < 0:
            return text, []
        calls = []
        for block in text[start + len(OPEN) :].split(OPEN):
            call = _hermes_block(block.split(CLOSE, 1)[0].strip())
            if call is None:
                return text, []
            calls.append(call)
        return text[:start] or None, calls

    @staticmethod
    def plain_text_end(text: str) -> int:
        """Up to the first <tool_call>, less a tail that may still grow into one."""
        return _text_before(text, OPEN)


class Llama3JsonCalls:
    """An answer that is nothing but calls, as JSON objects (Llama 3.1's JSON tool calling)."""

    name = "llama3_json"

    @staticmethod
    def parse(text: str) -> tuple[str | None, list[ToolCall]]:
        """No text and the calls, when the whole answer is calls; else the answer as text, no calls
        (as vLLM's parser: a call starts the answer, or there is none)."""
        body = text.strip()
        body = body.removeprefix(PYTHON_TAG).lstrip()
        if not body.startswith("{"):
            return text, []
        decoder, calls, i = json.JSONDecoder(), [], 0
        while i < len(body):
            try:
                obj, i = decoder.raw_decode(body, i)
            except ValueError:
                return text, []
            call = _call(obj, ("arguments", "parameters"), required=True)  # vLLM's order
            if call is None:
                return text, []
            calls.append(call)
            while i < len(body) and (body[i].isspace() or body[i] == ";"):
                i += 1
        return None, calls

    @staticmethod
    def plain_text_end(text: str) -> int:
        """All of it once it surely does not start with a call; nothing while it may."""
        head = text.lstrip()
        if not head or head.startswith("{") or head.startswith(PYTHON_TAG) or PYTHON_TAG.startswith(head):
            return 0
        return len(text)


# where xLAM models put their array of calls: a code block, the rest of a [TOOL_CALLS] line, <tool_call> tags
XLAM_BLOCKS = (re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL), re.compile(r"\[TOOL_CALLS\](.*?)(?=\n|$)", re.DOTALL),
               re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL))  # fmt: skip
XLAM_MARKERS = ("```", "[TOOL_CALLS]", "<tool_call>")
THINK_END = "</think>"


class XlamCalls:
    """xLAM: a JSON array of {"name", "arguments"} objects, the whole answer (or all of it after
    </think>), or in a code block, after [TOOL_CALLS] on its line, or in <tool_call> tags, the text
    around the block being the answer's (vLLM's xlam parser); objects that are no call are skipped."""

    name = "xlam"

    @staticmethod
    def parse(text: str) -> tuple[str | None, list[ToolCall]]:
        think = text.find(THINK_END)
        if think >= 0 and (calls := _xlam_array(text[think + len(THINK_END) :])):
            return text[: think + len(THINK_END)].strip() or None, calls
        for block in XLAM_BLOCKS:
            for found in block.finditer(text):
                if calls := _xlam_array(found.group(1)):
                    return block.sub("", text).strip() or None, calls
        return (None, calls) if (calls := _xlam_array(text)) else (text, [])

    @staticmethod
    def plain_text_end(text: str) -> int:
        """The text before a block (or what may still become one); nothing while the answer may be an array."""
        head = text.lstrip()
        if not head or head.startswith("["):
            return 0
        return min(_text_before(text, marker) for marker in XLAM_MARKERS)


def _xlam_array(text: str) -> list[ToolCall]:
    """The calls of a JSON array of {"name", "arguments"} objects (none: not such an array)."""
    body = text.strip()
    if not body.startswith("["):
        return []
    try:
        items = json.loads(body)
    except (ValueError, RecursionError):
        return []
    calls = [_call(item, ("arguments",), required=True) for item in items] if isinstance(items, list) else []
    return [call for call in calls if call is not None]


class MistralCalls:
    """[TOOL_CALLS] and the calls after the answer's text (the tag is a special token: the server
    keeps special tokens in the text of requests whose calls it reads)."""

    name = "mistral"

    @staticmethod
    def parse(text: str) -> tuple[str | None, list[ToolCall]]:
        """The text before [TOOL_CALLS] (None when there is none) and the calls; anything after the
        tag that is not calls leaves the whole answer as text."""
        start = text.find(MISTRAL_TAG)
        if start < 0:
            return text, []
        body = text[start + len(MISTRAL_TAG) :].strip()
        calls = _mistral_array(body) if body.startswith("[") else _mistral_named(body)
        return (text[:start] or None, calls) if calls else (text, [])

    @staticmethod
    def plain_text_end(text: str) -> int:
        return _text_before(text, MISTRAL_TAG)


def _mistral_array(body: str) -> list[ToolCall]:
    """[{"name": ..., "arguments": {...}}, ...] (what follows it is ignored, as vLLM's parser does)."""
    return _call_array(body, new_id=_mistral_id)


def _mistral_named(body: str) -> list[ToolCall]:
    """NAME{...} or NAME[ARGS]{...} for each call, each after its own [TOOL_CALLS]."""
    calls = []
    for piece in body.split(MISTRAL_TAG):
        piece = piece.strip()
        brace = piece.find("{")
        name = piece[:brace].removesuffix(MISTRAL_ARGS).strip() if brace > 0 else ""
        try:
            args, end = json.JSONDecoder().raw_decode(piece, brace) if name else (None, 0)
        except ValueError:
            return []
        if not isinstance(args, dict) or piece[end:].strip():
            return []
        calls.append(ToolCall(_mistral_id(), name, json.dumps(args, ensure_ascii=False)))
    return calls


class GraniteCalls:
    """An answer that is a JSON array of calls, <|tool_call|> (or <tool_call>) before it or not (Granite 3)."""

    name = "granite"
    tags = ("<|tool_call|>", "<tool_call>")

    @staticmethod
    def parse(text: str) -> tuple[str | None, list[ToolCall]]:
        """No text and the calls when the answer is the array, the tag before it or not (as vLLM's
        parser); else the answer as text."""
        body = text.strip()
        for tag in GraniteCalls.tags:
            body = body.removeprefix(tag)
        calls = _call_array(body.lstrip()) if body.lstrip().startswith("[") else []
        return (None, calls) if calls else (text, [])

    @staticmethod
    def plain_text_end(text: str) -> int:
        head = text.lstrip()
        if not head or head.startswith("[") or any(head.startswith(t) or t.startswith(head) for t in GraniteCalls.tags):
            return 0
        return len(text)


class Phi4MiniCalls:
    """functools[...] and a JSON array of calls in the answer (Phi-4-mini)."""

    name = "phi4_mini_json"
    tag = "functools"

    @staticmethod
    def parse(text: str) -> tuple[str | None, list[ToolCall]]:
        """The text before functools[...] (None when there is none; vLLM's parser drops it, but a
        stream has shown it by then) and the calls; else the answer as text."""
        start = text.find(Phi4MiniCalls.tag + "[")
        calls = _call_array(text[start + len(Phi4MiniCalls.tag) :]) if start >= 0 else []
        return (text[:start] or None, calls) if calls else (text, [])

    @staticmethod
    def plain_text_end(text: str) -> int:
        return _text_before(text, Phi4MiniCalls.tag + "[")


def _call_array(body: str, new_id=_openai_id) -> list[ToolCall]:
    """[{"name": ..., "arguments": {...}}, ...] at the start of body (what follows is ignored)."""
    try:
        value, _ = json.JSONDecoder().raw_decode(body)
    except ValueError:
        return []
    if not isinstance(value, list):
        return []
    calls = [_call(obj, ("arguments", "parameters"), required=True, new_id=new_id) for obj in value]
    return calls if calls and all(calls) else []


class Qwen3CoderCalls:
    """<tool_call> blocks of XML-like functions and parameters after the answer's text. Unlike the
    other parsers it needs the request's tools (each parameter's type): `for_tools` binds them."""

    name = "qwen3_coder"
    FUNCTION = re.compile(r"<function=([^>\n]*)>(.*?)(?:</function>|(?=<function=)|$)", re.DOTALL)
    PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|$)", re.DOTALL)
    BLOCK = (OPEN, CLOSE)  # a call's tags (around XML functions, or the JSON of a forced call)
    STARTS = (OPEN, "<function=")

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        """Never raises: a schema of an odd shape (validated elsewhere, or not) types its values as strings."""
        self.types: dict[str, dict[str, Any]] = {}  # function -> parameter -> its schema's type
        for tool in tools if isinstance(tools, list) else ():
            fn = tool.get("function") if isinstance(tool, dict) else None
            params = fn.get("parameters") if isinstance(fn, dict) else None
            props = params.get("properties") if isinstance(params, dict) else None
            if isinstance(props, dict):  # (None: the schema says no type)
                self.types[fn.get("name")] = {k: v.get("type") if isinstance(v, dict) else None
                                              for k, v in props.items()}  # fmt: skip

    @classmethod
    def for_tools(cls, tools: list[dict[str, Any]] | None) -> Qwen3CoderCalls:
        return cls(tools)

    def _json_calls(self, text: str) -> list[ToolCall | None]:
        """The calls of blocks that hold JSON objects, as Hermes' are (how a forced call is written)."""
        opening, closing = self.BLOCK
        return [_hermes_block(block.split(closing, 1)[0].strip()) for block in text.split(opening)[1:]]

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """The text before the first <tool_call> (or a bare <function=, as vLLM's parser reads it;
        None when there is none) and every function after it, several in one block too. Without
        one, <tool_call> blocks holding JSON objects are read as Hermes' (how a forced call is
        written). A function without a name, or no call at all, leaves the whole answer as text."""
        starts = [i for i in (text.find(tag) for tag in self.STARTS) if i >= 0]
        if not starts:
            return text, []
        start = min(starts)
        functions = self.FUNCTION.findall(text, start)
        if functions:
            calls = [self._call(name.strip(), body) for name, body in functions]
        else:
            calls = self._json_calls(text[start:])
        if not calls or not all(calls):
            return text, []
        return text[:start] or None, calls

    def _call(self, name: str, body: str) -> ToolCall | None:
        if not name:
            return None
        types = self.types.get(name, {})
        args = {key.strip(): _typed(value, types.get(key.strip()) or "string")
                for key, value in self.PARAMETER.findall(body)}  # fmt: skip
        return ToolCall(_openai_id(), name, json.dumps(args, ensure_ascii=False))

    @classmethod
    def plain_text_end(cls, text: str) -> int:
        return min(_text_before(text, tag) for tag in cls.STARTS)


class SeedOssCalls(Qwen3CoderCalls):
    """Seed-OSS's calls: Qwen3-Coder's functions and parameters, in <seed:tool_call> blocks."""

    name = "seed_oss"
    BLOCK = ("<seed:tool_call>", "</seed:tool_call>")
    STARTS = ("<seed:tool_call>", "<function=")


class Glm45Calls(Qwen3CoderCalls):
    """GLM-4.5 to 4.7's <tool_call> blocks: the function's name, then <arg_key>K</arg_key>
    <arg_value>V</arg_value> pairs (GLM-4.7 writes no newline after the name). As vLLM's glm45
    parser reads them: only closed blocks; a value as written where its parameter's schema says
    string, else JSON or a Python literal where it reads as one (a number JSON holds: no NaN or
    infinity), else as written. A block holding a JSON object is read as Hermes' (how a forced call
    is written)."""

    name = "glm45"
    CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)  # (closed: a cut one, or a mention, is text)
    ARGUMENT = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)
    STARTS = (OPEN,)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """The text before the first <tool_call> (None when there is none) and the calls; a block
        without a function's name leaves the whole answer as text."""
        start = text.find(OPEN)
        if start < 0:
            return text, []
        calls = [self._block(body) for body in self.CALL.findall(text, start)]
        if not calls or not all(calls):
            return text, []
        return text[:start] or None, calls

    def _block(self, body: str) -> ToolCall | None:
        if body.strip().startswith("{"):
            return _hermes_block(body.strip())
        name = body.split("<arg_key>", 1)[0].strip().split("\n", 1)[0].strip()
        if not name:
            return None
        types = self.types.get(name, {})
        args = {key.strip(): _glm_value(value.strip(), types.get(key.strip())) for key, value in self.ARGUMENT.findall(body)}
        return ToolCall(_openai_id(), name, json.dumps(args, ensure_ascii=False))


def _glm_value(value: str, kind: Any) -> Any:
    if kind == "string":
        return value
    for read in (json.loads, ast.literal_eval):
        try:
            parsed = read(value)
            json.dumps(parsed, allow_nan=False)  # (a set or bytes, NaN or infinity: no JSON value, the text stays)
            return parsed
        except Exception:  # (literal_eval's SyntaxError, ValueError, MemoryError, RecursionError...)
            continue
    return value


def _hermes_block(body: str) -> ToolCall | None:
    """A <tool_call> block's JSON object (None: not one with a name)."""
    try:
        return _call(json.loads(body), ("arguments", "parameters"))
    except ValueError:
        return None


def _typed(value: str, kind: Any) -> Any:
    """A parameter's text as its schema's type says (as vLLM's qwen3_coder parser reads it): one
    newline around it dropped; null is None; a string as written; what does not read as its type
    stays a string."""
    value = value.removeprefix("\n").removesuffix("\n")
    kind = (kind[0] if kind else "string") if isinstance(kind, list) else str(kind).lower()
    if value.strip().lower() == "null":
        return None
    try:
        if kind in ("string", "str", "text", "varchar", "char", "enum"):
            return value
        if kind.startswith(("int", "uint", "long", "short", "unsigned")):
            return int(value.strip())
        if kind.startswith(("num", "float")):
            number = float(value.strip())
            if not math.isfinite(number):  # JSON holds no infinity or NaN: the text as written
                return value
            return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number
        if kind in ("boolean", "bool", "binary"):
            return value.strip().lower() == "true"
        return json.loads(value)  # object, array, or a type not known: JSON if it reads as JSON
    except ValueError:
        return value


class PythonicCalls:
    """An answer that is nothing but a Python list of calls with keyword arguments."""

    name = "pythonic"

    @staticmethod
    def parse(text: str) -> tuple[str | None, list[ToolCall]]:
        """No text and the calls, when the whole answer is such a list; else the answer as text, no
        calls (as vLLM's parser). A call's `**{...}` (how a forced call is written) spreads its keys."""
        body = text.strip().removeprefix(PYTHON_START).removesuffix(PYTHON_END).strip()
        if not (body.startswith("[") and body.endswith("]")):
            return text, []
        try:
            with warnings.catch_warnings():  # a string's invalid escape ("a\/b") is the model's, not ours to report
                warnings.simplefilter("ignore", (DeprecationWarning, SyntaxWarning))
                tree = ast.parse(body, mode="eval").body
            calls = [_python_call(node, body) for node in tree.elts] if isinstance(tree, ast.List) else []
        except (SyntaxError, ValueError, RecursionError, MemoryError):  # MemoryError: "too complex" to parse
            return text, []
        return (None, calls) if calls else (text, [])

    @staticmethod
    def plain_text_end(text: str) -> int:
        """All of it once it surely does not start with a list of calls; nothing while it may."""
        head = text.lstrip()
        if not head or head.startswith(("[", PYTHON_START)) or PYTHON_START.startswith(head):
            return 0
        return len(text)


FUNCTION_CALLS_OPEN, FUNCTION_CALLS_CLOSE = "<function_calls>", "</function_calls>"
_CALL_START = re.compile(r"\s*[A-Za-z_][\w.]*(\(|$)")  # a line that may still be a call: NAME(...


class Olmo3Calls:
    """OLMo 3: Python calls with keyword arguments, one a line, in <function_calls> tags (the text
    before them is the answer's), or an answer that is nothing but such lines; JSON's true, false
    and null read as literals (vLLM's olmo3 parser)."""

    name = "olmo3"

    @staticmethod
    def parse(text: str) -> tuple[str | None, list[ToolCall]]:
        start = text.find(FUNCTION_CALLS_OPEN)
        end = text.find(FUNCTION_CALLS_CLOSE, start + 1) if start >= 0 else -1
        head, block = (text[:start].strip() or None, text[start + len(FUNCTION_CALLS_OPEN) : end]) if end >= 0 else (None, text)
        block = block.strip()
        try:  # statements, not lines: a call's JSON arguments (a forced call's) may span lines
            with warnings.catch_warnings():  # a string's invalid escape ("a\/b") is the model's, not ours to report
                warnings.simplefilter("ignore", (DeprecationWarning, SyntaxWarning))
                statements = ast.parse(block).body
            if not statements or not all(isinstance(st, ast.Expr) for st in statements):
                return text, []
            return head, [_python_call(st.value, block) for st in statements]
        except (SyntaxError, ValueError, RecursionError, MemoryError):  # MemoryError: "too complex" to parse
            return text, []

    @staticmethod
    def plain_text_end(text: str) -> int:
        """The text before a <function_calls> block (or what may still become one); nothing while the
        answer may still be bare call lines."""
        if _CALL_START.match(text):  # (held whole: the answer may be bare call lines, said at its end)
            return 0
        start = text.find(FUNCTION_CALLS_OPEN)
        if start >= 0:
            return start
        return len(text) - tag_prefix_at_end(text, FUNCTION_CALLS_OPEN)


def _python_call(node: ast.expr, source: str) -> ToolCall:
    if not isinstance(node, ast.Call) or node.args:
        raise ValueError("not a call with keyword arguments only")
    name, args = _dotted(node.func), {}
    for kw in node.keywords:
        if kw.arg is not None:
            args[kw.arg] = _literal(kw.value)
            continue
        # **{...}: a forced call's arguments, written as JSON, read as JSON (its escapes, \/ and
        # surrogate pairs, are not Python's); else as Python literals
        try:
            value = json.loads(ast.get_source_segment(source, kw.value) or "", parse_constant=_no_constant)
        except ValueError:
            value = _literal(kw.value)
        if not isinstance(value, dict):
            raise ValueError("** of something that is not a dict")
        args.update(value)
    return ToolCall(_openai_id(), name, json.dumps(args, ensure_ascii=False, allow_nan=False))


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _joined_surrogates(text: str) -> str:
    """Python reads "\\ud83d\\ude00" as two lone surrogates, JSON as one character: joined so."""
    try:
        return text.encode("utf-16", "surrogatepass").decode("utf-16")
    except UnicodeDecodeError:
        raise ValueError("a string with a lone surrogate") from None


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    raise ValueError("a call of something that is not a name")


JSON_NAMES = {"true": True, "false": False, "null": None}


def _literal(node: ast.expr) -> Any:
    """A literal argument (Python's, or JSON's true/false/null) as JSON would hold it: a string's
    surrogate pairs joined (none left alone), a number finite."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return _joined_surrogates(node.value)
    if isinstance(node, ast.Constant) and isinstance(node.value, float) and not math.isfinite(node.value):
        raise ValueError("a number JSON cannot hold")
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (int, float, bool))):
        return node.value
    if isinstance(node, ast.Name) and node.id in JSON_NAMES:
        return JSON_NAMES[node.id]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict) and all(k is not None for k in node.keys):
        keys = [_literal(k) for k in node.keys]
        if not all(isinstance(k, str) for k in keys):
            raise ValueError("a dict argument with keys that are not strings")
        return dict(zip(keys, (_literal(v) for v in node.values)))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    raise ValueError("an argument that is not a literal")


class OpenAICalls:
    """gpt-oss's harmony messages to functions.NAME, their bodies the arguments (a JSON object)."""

    name = "openai"

    @staticmethod
    def parse(text: str) -> tuple[str | None, list[ToolCall]]:
        """The text before the first message (None when there is none) and the calls; the answer
        as text when a message there calls no function or its arguments are no JSON object."""
        start = harmony.first_message_start(text)
        found = harmony.messages(text[start:])
        calls = [ToolCall(_openai_id(), name, m.body.strip()) for m in found
                 if (name := harmony.function_name(m.recipient)) and _is_object(m.body.strip())]  # fmt: skip
        if not found or len(calls) != len(found):
            return text, []
        return text[:start] or None, calls

    @staticmethod
    def plain_text_end(text: str) -> int:
        return harmony.first_message_start(text)


ToolCallParser = (type[HermesCalls] | type[Llama3JsonCalls] | type[MistralCalls] | type[GraniteCalls]
                  | type[Phi4MiniCalls] | type[PythonicCalls] | type[Qwen3CoderCalls] | Qwen3CoderCalls
                  | type[OpenAICalls] | type[Olmo3Calls] | type[XlamCalls])  # fmt: skip
# by name; then vLLM's other names for the same formats (its same parser classes)
TOOL_CALL_PARSERS: dict[str, ToolCallParser] = {
    **{p.name: p for p in (HermesCalls, Llama3JsonCalls, MistralCalls, GraniteCalls, Phi4MiniCalls, PythonicCalls,
                           Qwen3CoderCalls, OpenAICalls, Glm45Calls, SeedOssCalls, Olmo3Calls, XlamCalls)},
    "qwen3_xml": Qwen3CoderCalls, "llama4_json": Llama3JsonCalls, "glm47": Glm45Calls,
    "ernie45": HermesCalls,  # (ERNIE 4.5 writes Hermes' <tool_call> blocks)
}  # fmt: skip
# whose tag is a special token: a request whose calls are read keeps special tokens in its text (as vLLM)
KEEP_SPECIAL_TOKENS = ("mistral", "granite", "openai")


def for_request(parser: ToolCallParser, tools: list[dict[str, Any]] | None) -> ToolCallParser:
    """The server's parser as one request reads its answer (qwen3_coder's types come from its tools)."""
    return parser.for_tools(tools) if hasattr(parser, "for_tools") else parser


def tool_call_parser(name: str) -> ToolCallParser:
    if name not in TOOL_CALL_PARSERS:
        raise ValueError(f"tool call parser must be one of {', '.join(TOOL_CALL_PARSERS)}, got {name!r}")
    return TOOL_CALL_PARSERS[name]
