"""Fold a request's model context into Ollama's ``system`` prompt.

The user's input goes to Ollama's ``prompt`` untouched; the session and
metadata go to ``system`` through a configurable template. Metadata is rendered
as JSON so a value cannot close a sentence of the template and start its own.

The order matters for speed: a backend evaluates a prompt once and reuses the
cached prefix two prompts share, up to their first difference. Fixed text that
follows a per-request field is evaluated again for every request, so
:meth:`PromptTemplate.prefix_advice` says when a template puts fields first.

A template that frames only the metadata adds nothing to a request without any:
the model's own system prompt applies and the call reaches it as its client sent it.
Measured on the real model (bench/real_throughput.py), the default template's few
words on every request cost 12% of the tokens/s (docs/performance.md).
"""

from __future__ import annotations

import json
import string

from nexus.settings import ConfigError
from schemas import ModelContext

_ALLOWED = {"session_id", "metadata_json"}


class TemplateError(ConfigError):
    """The configured prompt template names a field Nexus does not provide."""


class PromptTemplate:
    def __init__(self, template: str) -> None:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        unknown = names - _ALLOWED
        if unknown:
            raise TemplateError(
                f"prompt_template uses {{{sorted(unknown)[0]}}}; available: "
                + ", ".join(f"{{{n}}}" for n in sorted(_ALLOWED))
            )
        self._template = template
        self._parts = list(string.Formatter().parse(template))
        # Fields only {metadata_json}: with no metadata there is nothing to say.
        self._frames_metadata = names == {"metadata_json"}

    def prefix_advice(self) -> str | None:
        """Why this template keeps backends from reusing a cached prompt prefix, or None.

        Fixed text after the first field differs in position from request to request
        (it follows values that differ), so it is evaluated again each time.
        """
        seen_field = None
        for literal, name, _, _ in self._parts:
            if seen_field is not None and literal.strip():
                return (
                    f"worker.prompt_template has fixed text after {{{seen_field}}}: a backend evaluates it "
                    "again for every request; put fixed text first and the fields last"
                )
            if name is not None and seen_field is None:
                seen_field = name
        return None

    def system_prompt(self, context: ModelContext) -> str:
        """The system prompt for a request; ``""`` (none: the model's own) when the template
        frames only the metadata and the request has none."""
        if self._frames_metadata and not context.metadata:
            return ""
        return self._template.format(
            session_id=json.dumps(context.session_id),
            metadata_json=_escape_line_breaks(
                json.dumps(context.metadata, sort_keys=True, ensure_ascii=False)
            ),
        )


# json.dumps(ensure_ascii=False) escapes \n and \r but leaves these Unicode line
# breaks raw; escaped, the JSON is the same value and the prompt stays on its lines.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _escape_line_breaks(text: str) -> str:
    return text.translate(_LINE_BREAKS)
