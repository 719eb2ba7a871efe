"""The root of every exception Nexus raises on purpose.

Catch :class:`NexusError` to catch them all; each role's errors derive from it::

    NexusError
    ├── ConfigError (also ValueError)              nexus.settings: a setting is wrong; the message names it
    │   ├── KafkaAccessError                       nexus.kafka.clients: credentials or TLS refused
    │   └── TemplateError                          streams.answering.prompt: worker.prompt_template
    ├── KafkaUnavailableError (also RuntimeError)  nexus.kafka.topics: no broker answered in time
    ├── TopicCreationError (also RuntimeError)     nexus.kafka.topics: the cluster refused to create a topic
    ├── TopicMissingError                          nexus.kafka.readers: a topic Nexus reads does not exist
    ├── OllamaHostError (also ValueError)          nexus.ollama_host: an OLLAMA_HOST no Ollama client accepts
    ├── StartError                                 nexus.startup: the gateway or worker cannot start (port, Kafka)
    ├── AccessError                                nexus.access: an API key was refused
    │   ├── Unauthenticated                        no key, or an unknown one (401)
    │   └── Forbidden                              a key used beyond its models or sessions (403)
    ├── SchemaError (also ValueError)              schemas.codec: bytes or values that are not a Nexus record
    │   ├── NotAvroError                           no single-object header
    │   ├── UnknownSchemaError                     a fingerprint no known schema has
    │   ├── MalformedRecordError                   a body that does not decode
    │   └── InvalidValueError                      a value its schema refuses
    ├── RejectedRequest (also ValueError)          schemas.validation: a request breaks the contract (400)
    │   └── FrameError                             consumers.bridge.frames: a websocket frame does
    ├── BackendError                               streams.backends: a model endpoint failed a call
    ├── HttpError                                  streams.backends.http: an exchange with an endpoint failed
    │   ├── ConnectError                           no connection was made: the request reached no server
    │   └── Disconnected                           the connection broke before the answer was whole
    ├── Unsendable (also ValueError)               streams.backends.wire: a request's JSON text cannot go in a body
    ├── Expired                                    streams.answering: a request's deadline passed
    ├── Unavailable                                streams.answering: no endpoint of the model can answer
    ├── Undeliverable                              streams.commits.outbox: Kafka refused a record for good
    ├── ProducerError (also RuntimeError)          producers.client: the producer API
    │   ├── SubmitError                            Kafka did not accept a request
    │   │   └── RequestTooLarge                    over schemas.limits.MAX_RECORD_BYTES, not produced (413)
    │   ├── ResponseTimeoutError (also TimeoutError)  no answer in time
    │   ├── ResponsesUnavailableError              the answers cannot be read
    │   └── ProducerClosedError                    the producer was closed
    ├── ReplyError                                 producers.replies: waiting for answers
    │   ├── ReplyTimeoutError (also TimeoutError)  no answer in time
    │   └── ReplyReaderError                       the reply reader cannot read
    ├── InvalidInputError (also ValueError)        producers.submit: a line `nexus submit` cannot use
    ├── BridgeStartError                           consumers.bridge: the bridge cannot start
    ├── HistoryError                               consumers.bridge: a session's history cannot be read
    ├── TooManySubscriptions (also ValueError)     consumers.bridge.subscriptions: a client's limit
    ├── OutboxClosed                               consumers.bridge.delivery: the client is gone
    ├── ReplayError                                consumers.replay: a replay cannot be done as asked
    │   ├── ReplayArgumentError (also ValueError)  a bad --since, --topics, --grace...
    │   └── ReplayKafkaError                       Kafka refused or did not answer
    │       └── ReplayStalledError                 Kafka stopped delivering mid-replay
    ├── LocalKafkaError                            localdev.broker: the local broker failed to start
    ├── LocalOllamaError                           localdev.ollama: the local Ollama cannot be built or started
    ├── SimulatorConfigError (also ValueError)     localdev.simulator: a bad simulator option
    ├── SchemaProblem (also ValueError)            localdev.simulator.schema: a format schema Ollama refuses
    └── ApiError                                   localdev.simulator: an Ollama-shaped error answer

The "also" bases are kept where users already catch them (a bad setting has always
been a ``ValueError``). Errors that are a client's fault are answered, not raised:
the gateway and the bridge turn them into 4xx bodies and error frames.
"""

from __future__ import annotations

__all__ = ["NexusError"]


class NexusError(Exception):
    """Something Nexus detected and can explain; the message says what to do about it."""
