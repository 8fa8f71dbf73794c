"""Tool calling: OpenAI `tools` / `tool_choice` into a prompt and a grammar, and the model's calls back out.

A chat template that takes `tools` (it names the variable) renders the definitions itself. For one that
does not (SmolLM2's), onnxlm uses one default format, Hermes-style as Qwen2.5 and NousResearch models
were trained on:

    system:    <the system message, if any>

               # Tools
               You may call one or more functions to assist with the user query.
               You are provided with function signatures within <tools></tools> XML tags:
               <tools>
               {"type": "function", "function": {"name": ..., "description": ..., "parameters": ...}}
               </tools>
               For each function call, return a json object with function name and arguments within
               <tool_call></tool_call> XML tags:
               <tool_call>
               {"name": <function-name>, "arguments": <args-json-object>}
               </tool_call>
    assistant: <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>     (a turn's tool_calls)
    user:      <tool_response>\\n...\\n</tool_response>                        (a `tool` message)

A call is always written `<tool_call>\\n{"name": "NAME", "arguments": ARGS}\\n</tool_call>`, calls one per
line. tool_choice "required" or a named function constrain the output to such calls, with ARGS
following the function's `parameters` schema (llguidance, %json); "auto" lets the model choose between
plain text (which then cannot contain "<tool_call>") and constrained calls; "none" renders no tools.
The answer's calls are read in this one format also where the template renders the tools itself
(Qwen2.5 and Hermes models answer in it natively; a model trained on another call syntax, such as
Llama 3.1's bare JSON, still produces valid calls under "required", while its "auto" calls come back
as text).
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from .constraints import JSON_OPTIONS

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_HEADER = re.compile(r'<tool_call>\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\S)')
_CLOSER = re.compile(r"\}\s*</tool_call>")
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")

SYSTEM_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
SYSTEM_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


@dataclass
class ToolCall:
    name: str
    arguments: str  # the arguments as JSON text, as OpenAI sends them
    id: str = field(default_factory=lambda: "call_" + secrets.token_hex(12))

    def openai(self, index: int | None = None) -> dict[str, Any]:
        out = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return out if index is None else {"index": index, **out}


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """OpenAI tool definitions, checked; each function gets a parameters schema ({"type": "object"} when
    none is given). Raises ValueError naming the bad entry."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ValueError(f"tools must be a list, got {type(tools).__name__}")
    out, names = [], set()
    for i, tool in enumerate(tools):
        if (
            not isinstance(tool, dict)
            or tool.get("type") != "function"
            or not isinstance(tool.get("function"), dict)
        ):
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}")
        fn = tool["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(
                f"tools[{i}].function.name must be 1-64 letters, digits, '_', '.' or '-'; got {name!r}"
            )
        if name in names:
            raise ValueError(f"tools[{i}]: two tools are named {name!r}")
        names.add(name)
        params = fn.get("parameters", {"type": "object"})
        if not isinstance(params, dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        description = fn.get("description")
        if description is not None and not isinstance(description, str):
            raise ValueError(f"tools[{i}].function.description must be a string")
        entry = {"name": name, "parameters": params or {"type": "object"}}
        if description:
            entry["description"] = description
        out.append({"type": "function", "function": entry})
    return out


def check_tool_choice(choice: Any, tools: list[dict[str, Any]]) -> str:
    """'none', 'auto', 'required' or the name of the one function to call. Default: auto with tools."""
    if choice is None:
        return "auto" if tools else "none"
    if choice in ("none", "auto", "required"):
        if choice != "none" and not tools:
            raise ValueError(f"tool_choice {choice!r} needs tools")
        return choice
    if (
        isinstance(choice, dict)
        and choice.get("type") == "function"
        and isinstance(choice.get("function"), dict)
    ):
        name = choice["function"].get("name")
        if name not in {t["function"]["name"] for t in tools}:
            raise ValueError(f"tool_choice names the function {name!r}, which is not among the tools")
        return name
    raise ValueError(
        "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}"
    )


def template_takes_tools(chat_template: str | None) -> bool:
    """Whether a chat template renders a `tools` variable itself."""
    return bool(chat_template) and re.search(r"\btools\b", chat_template) is not None


def call_text(name: str, arguments: str) -> str:
    return f'{OPEN}\n{{"name": {json.dumps(name)}, "arguments": {arguments}}}\n{CLOSE}'


def render_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages in the default format: the tool definitions in the system message, assistant tool calls
    and tool results as text (for templates that know nothing of tools)."""
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [_history_call(c) for c in m["tool_calls"]]
            text = "\n".join(call_text(n, a) for n, a in calls)
            content = f"{m['content']}\n{text}" if m.get("content") else text
            out.append({"role": "assistant", "content": content})
        elif m["role"] == "tool":
            content = m["content"] if isinstance(m["content"], str) else json.dumps(m["content"])
            out.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        else:
            out.append({k: v for k, v in m.items() if k != "tool_calls"})
    if tools:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        block = SYSTEM_HEADER + listing + SYSTEM_FOOTER
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{block}"}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def _history_call(call: Any) -> tuple[str, str]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ValueError("an assistant message's tool_calls must be [{'function': {'name', 'arguments'}}]")
    args = fn.get("arguments", "{}")
    if not isinstance(args, str):
        args = json.dumps(args)
    return fn["name"], args


def tool_grammar(tools: list[dict[str, Any]], choice: str, parallel: bool = True) -> str | None:
    """A Lark grammar (llguidance's dialect) for the output tool_choice allows; None for 'none'."""
    if choice == "none" or not tools:
        return None
    chosen = [t for t in tools if choice in ("auto", "required") or t["function"]["name"] == choice]
    rules = []
    for i, t in enumerate(chosen):
        fn = t["function"]
        head = json.dumps(f'{OPEN}\n{{"name": {json.dumps(fn["name"])}, "arguments": ')
        tail = json.dumps(f"}}\n{CLOSE}")
        schema = {**fn["parameters"], "x-guidance": JSON_OPTIONS}  # compact arguments, as json.dumps writes
        rules.append(f"call_{i}: {head} args_{i} {tail}\nargs_{i}: %json {json.dumps(schema)}")
    calls = 'call ("\\n" call)*' if parallel else "call"
    start = f"start: {calls}" if choice != "auto" else f"start: TEXT | {calls}"
    lines = [start, "call: " + " | ".join(f"call_{i}" for i in range(len(chosen))), *rules]
    if choice == "auto":  # any text that does not open a call
        lines.append(r"TEXT: /(.|\n)+/ & ~/(.|\n)*<tool_call>(.|\n)*/")
    return "\n".join(lines)


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """(the text outside calls or None, the calls) of a finished answer. A block that is not a JSON
    object with a name stays text. A call cut off by max_tokens is read as the stream reads it
    (ToolCallStream): once its name is complete it is a call whose arguments are what arrived (as
    OpenAI returns a call cut by `length`); before that it is dropped after other calls and stays
    text when there are none. Either way no half-written `<tool_call>` is left in the content."""
    calls, rest, at = [], [], 0
    for m in re.finditer(r"<tool_call>\s*(.*?)\s*</tool_call>", text, re.S):
        try:
            obj = json.loads(m.group(1))
        except ValueError:
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            continue
        args = obj.get("arguments", obj.get("parameters", {}))
        calls.append(
            ToolCall(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))
        )
        rest.append(text[at : m.start()])
        at = m.end()
    tail = text[at:]
    cut = tail.find(OPEN)
    if cut >= 0 and CLOSE not in tail[cut:]:  # a call max_tokens cut off
        head = _HEADER.match(tail, cut)
        if head:
            calls.append(ToolCall(json.loads(f'"{head.group(1)}"'), tail[head.end() :]))
        if calls:
            tail = tail[:cut]
    rest.append(tail)
    content = "".join(rest).strip() if calls else text
    return (content or None), calls


class ToolCallStream:
    """Turn streamed text into OpenAI deltas: ("content", text) until the answer opens a call, then
    ("call", {"index", "id", "type", "function": {"name", "arguments": ""}}) once a name is complete and
    ("args", {"index", "function": {"arguments": fragment}}) as arguments arrive; a fragment that could
    be the start of the closing `}</tool_call>` is held back until it is known not to be."""

    def __init__(self):
        self.buf = ""  # text not yet turned into deltas
        self.mode = "start"  # start | text | header | args | between
        self.calls: list[ToolCall] = []

    def push(self, text: str) -> list[tuple[str, dict | str]]:
        self.buf += text
        out: list[tuple[str, dict | str]] = []
        while True:
            before = (self.mode, len(self.buf))
            out += self._step()
            if (self.mode, len(self.buf)) == before:
                return out

    def _step(self) -> list[tuple[str, dict | str]]:
        if self.mode == "text":
            text, self.buf = self.buf, ""
            return [("content", text)] if text else []
        if self.mode in ("start", "between"):
            head = self.buf.lstrip()
            if head.startswith(OPEN):
                self.mode = "header"
            elif head and not OPEN.startswith(head):
                self.mode = "text"
            return []
        if self.mode == "header":
            m = _HEADER.search(self.buf)
            if not m:
                return []
            call = ToolCall(json.loads(f'"{m.group(1)}"'), "")
            self.calls.append(call)
            self.buf, self.mode = self.buf[m.end() :], "args"
            first = call.openai(len(self.calls) - 1)
            return [("call", {**first, "function": {"name": call.name, "arguments": ""}})]
        # args: up to the closer, holding back a possible start of it
        m = _CLOSER.search(self.buf)
        if m:
            fragment, self.buf, self.mode = self.buf[: m.start()], self.buf[m.end() :], "between"
        else:
            k = self.buf.rfind("}")
            hold = k >= 0 and CLOSE.startswith(self.buf[k + 1 :].lstrip())
            cut = k if hold else len(self.buf)
            fragment, self.buf = self.buf[:cut], self.buf[cut:]
        return self._args(fragment)

    def _args(self, fragment: str) -> list[tuple[str, dict | str]]:
        if not fragment:
            return []
        self.calls[-1].arguments += fragment
        return [("args", {"index": len(self.calls) - 1, "function": {"arguments": fragment}})]

    def finish(self) -> list[tuple[str, dict | str]]:
        """Whatever is still held: the rest of a cut-off call's arguments, or text."""
        rest, self.buf = self.buf, ""
        if self.mode == "args":
            return self._args(rest)
        if self.mode in ("start", "between", "header") and rest.strip() and not self.calls:
            return [("content", rest)]
        return []


def prepare_chat(
    messages: list[dict[str, Any]],
    tools: Any,
    tool_choice: Any,
    parallel_tool_calls: bool,
    chat_template: str | None,
) -> tuple[list[dict[str, Any]], dict[str, Any], str | None, bool]:
    """(messages to render, extra template variables, the Lark grammar the answer must follow or None,
    whether to parse tool calls from the answer) for a chat request with tools."""
    tools = check_tools(tools)
    choice = check_tool_choice(tool_choice, tools)
    if not isinstance(parallel_tool_calls, bool):
        raise ValueError(f"parallel_tool_calls must be true or false, got {parallel_tool_calls!r}")
    has_history = any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
    offered = tools if choice != "none" else []
    if template_takes_tools(chat_template):
        extra = {"tools": offered} if offered else {}
        messages = [_arguments_as_objects(m) for m in messages]
        return messages, extra, tool_grammar(tools, choice, parallel_tool_calls), bool(offered)
    if has_history or offered:
        messages = render_messages(messages, offered)
    return messages, {}, tool_grammar(tools, choice, parallel_tool_calls), bool(offered)


def _arguments_as_objects(message: dict[str, Any]) -> dict[str, Any]:
    """An assistant turn's tool calls with their arguments as objects: OpenAI sends them as JSON text,
    templates (Qwen's, Llama's) write them with `tojson` and expect a mapping (as vLLM passes them)."""
    if not message.get("tool_calls"):
        return message
    calls = []
    for call in message["tool_calls"]:
        name, args = _history_call(call)
        try:
            parsed = json.loads(args)
        except ValueError:
            parsed = args
        calls.append({**call, "function": {**call["function"], "name": name, "arguments": parsed}})
    return {**message, "tool_calls": calls}
