"""Ollama's and OpenAI's HTTP APIs on the gateway, answered through Kafka (``docs/drop-in.md``).

``add_dropin_routes`` is what the gateway needs: it registers both APIs' routes and the
reply reader's lifecycle. Inside: :mod:`.call` (one call's flow, shared by both APIs),
:mod:`.ollama` and :mod:`.openai` (what differs), :mod:`.conversation` (headers,
conversations, model names), :mod:`.spec` (their part of ``/openapi.json``) and
:mod:`.routes` (the wiring).
"""

from producers.gateway.dropin.call import DropIn, DropInMetrics
from producers.gateway.dropin.routes import add_dropin_routes
from producers.gateway.dropin.spec import dropin_parameters, dropin_paths, dropin_schemas

__all__ = ["DropIn", "DropInMetrics", "add_dropin_routes", "dropin_parameters", "dropin_paths", "dropin_schemas"]
