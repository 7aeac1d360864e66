"""What a request says its answer must be: OpenAI's response_format (text, json_object,
json_schema) and vLLM's structured outputs (guided_json, guided_choice, guided_regex,
guided_grammar, or structured_outputs with json / choice / regex / grammar / json_object), as SamplingParams fields; and each forced tool's parameters schema."""

from __future__ import annotations

import logging
from typing import Any

from cachedattention.engine.tool_choice import parameters_node
from cachedattention.sampling import NO_STRUCTURED_CONSTRAINT
from cachedattention.server.api_error import bad

log = logging.getLogger(__name__)

UNSUPPORTED = ("guided_whitespace_pattern",)  # vLLM's, not held to here
STRUCTURED_KEYS = ("json", "choice", "regex", "grammar", "json_object")


def guided_fields(body: dict) -> tuple[dict[str, Any], str | None]:
    """SamplingParams' guided field (json_object, json_schema, choice, regex or grammar) from
    whichever one request field asks for it, and that field's name (SamplingParams compiles the
    form once; where it cannot be followed, the 400 names this field)."""
    asked: dict[str, dict[str, Any]] = {}
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        asked["response_format"] = _response_format(fmt)
    if body.get("guided_json") is not None:
        asked["guided_json"] = {"json_schema": body["guided_json"]}
    if body.get("guided_choice") is not None:
        asked["guided_choice"] = {"choice": _choice(body["guided_choice"], "guided_choice")}
    if body.get("guided_regex") is not None:
        asked["guided_regex"] = {"regex": body["guided_regex"]}
    if body.get("guided_grammar") is not None:
        asked["guided_grammar"] = {"grammar": body["guided_grammar"]}
    for key in UNSUPPORTED:
        if body.get(key) is not None:
            raise bad(f"{key} is not supported by this server (guided_json, guided_choice, guided_regex and guided_grammar are)", key,
                      "unsupported_parameter")  # fmt: skip
    if body.get("structured_outputs") is not None:
        asked.update(_structured_outputs(body["structured_outputs"]))
    if len(asked) > 1:
        first, second = list(asked)[:2]
        raise bad(f"{first} and {second} cannot be combined: the answer follows one of them", second)
    field = next(iter(asked), None)
    return asked.get(field, {}), None if field is None else field.split(".")[0]


def _response_format(fmt: Any) -> dict[str, Any]:
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        return {"json_object": True}
    if kind != "json_schema":
        raise bad("response_format must be {'type': 'text'}, {'type': 'json_object'} or {'type': 'json_schema', "
                  "'json_schema': {'name': ..., 'schema': {...}}}", "response_format")  # fmt: skip
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise bad("response_format.json_schema must be an object with the schema under 'schema'", "response_format")
    return {"json_schema": spec.get("schema", {})}


def _structured_outputs(v: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(v, dict):
        raise bad("structured_outputs must be an object", "structured_outputs", "invalid_type")
    for key, value in v.items():
        if key not in STRUCTURED_KEYS and value not in (None, False):
            raise bad(f"structured_outputs.{key} is not supported by this server (json, choice, regex, grammar and json_object are)",
                      "structured_outputs", "unsupported_parameter")  # fmt: skip
    asked = {}
    if v.get("json") is not None:
        asked["structured_outputs.json"] = {"json_schema": v["json"]}
    if v.get("choice") is not None:
        asked["structured_outputs.choice"] = {"choice": _choice(v["choice"], "structured_outputs")}
    if v.get("regex") is not None:
        asked["structured_outputs.regex"] = {"regex": v["regex"]}
    if v.get("grammar") is not None:
        asked["structured_outputs.grammar"] = {"grammar": v["grammar"]}
    if v.get("json_object"):
        asked["structured_outputs.json_object"] = {"json_object": True}
    if not asked:  # (as vLLM's StructuredOutputsParams; else the answer would silently go unconstrained)
        raise bad(f"structured_outputs: {NO_STRUCTURED_CONSTRAINT}", "structured_outputs")
    return asked


def _choice(v: Any, param: str) -> tuple[str, ...]:
    if not isinstance(v, list) or not v or not all(isinstance(c, str) and c for c in v):
        raise bad(f"{param} must be a non-empty list of non-empty strings", param)
    return tuple(v)


def forced_parameters(tools: list[dict[str, Any]], names: tuple[str, ...]) -> tuple[Any, ...]:
    """The parameters schema each forced function's arguments follow: its own where it can be held
    to; where it cannot, any object (as OpenAI, best effort), unless the function says strict: true."""
    by_name = {t["function"]["name"]: (j, t["function"]) for j, t in enumerate(tools)}
    out = []
    for name in names:
        j, fn = by_name[name]
        schema = fn.get("parameters")
        try:
            parameters_node(schema or {"type": "object"})
        except ValueError as e:
            if fn.get("strict") is True:
                raise bad(f"tools[{j}].function.parameters: {e}", f"tools[{j}].function.parameters") from None
            log.info("tool %r: its arguments are held to any JSON object (%s)", name, e)
            schema = None
        out.append(schema or "")
    return tuple(out)
