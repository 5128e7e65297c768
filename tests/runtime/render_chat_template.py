"""Renders conversations with a Jinja chat template the way Hugging Face's
apply_chat_template(tokenize=False) does (transformers' chat_template_utils): an immutable
sandboxed environment with trim_blocks, lstrip_blocks and the loopcontrols extension,
raise_exception and strftime_now as globals, tojson as json.dumps(ensure_ascii=False), and the
variables bos_token, eos_token, then the caller's kwargs, then messages, tools, documents and
add_generation_prompt.

usage: render_chat_template.py TEMPLATE BOS EOS CASES  (prints a JSON list)
TEMPLATE: a .jinja file, or a tokenizer_config.json whose chat_template is used.
CASES: [{"messages": [...], "add_generation_prompt": bool, "tools": [...]?, "kwargs": {...}?}]
Each output item is {"text": rendered} or {"error": message} when the template raised.
"""
import json
import sys
from datetime import datetime

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(format):
    return datetime.now().strftime(format)


def main():
    path, bos, eos, cases_path = sys.argv[1:5]
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        text = json.loads(text)["chat_template"]
    with open(cases_path, encoding="utf-8") as f:
        cases = json.load(f)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    template = env.from_string(text)
    out = []
    for c in cases:
        variables = {"bos_token": bos, "eos_token": eos, **c.get("kwargs", {})}
        try:
            out.append({"text": template.render(messages=c["messages"], tools=c.get("tools"), documents=None,
                                                add_generation_prompt=c["add_generation_prompt"], **variables)})
        except Exception as e:  # the template refused the conversation
            out.append({"error": f"{type(e).__name__}: {e}"})
    json.dump(out, sys.stdout, ensure_ascii=False)


main()
