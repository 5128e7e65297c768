"""Renders conversations with a tokenizer_config.json's Jinja chat_template, the way Hugging
Face's apply_chat_template(tokenize=False) does: sandboxed environment, trim_blocks and
lstrip_blocks, the special tokens as variables.

usage: render_chat_template.py tokenizer_config.json cases.json  (prints a JSON list of strings)
cases.json: [{"messages": [...], "add_generation_prompt": bool}, ...]
"""
import json
import sys

from jinja2.sandbox import ImmutableSandboxedEnvironment


def token_text(value):
    if isinstance(value, dict):
        return value.get("content")
    return value


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        config = json.load(f)
    with open(sys.argv[2], encoding="utf-8") as f:
        cases = json.load(f)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(config["chat_template"])
    specials = {k: token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    out = [template.render(messages=c["messages"], add_generation_prompt=c["add_generation_prompt"], **specials)
           for c in cases]
    json.dump(out, sys.stdout, ensure_ascii=False)


main()
