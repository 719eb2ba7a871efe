"""The root of every exception Nexus raises on purpose.

Catch :class:`NexusError` to catch them all; each role's errors derive from it::

    NexusError
    ├── ConfigError (also ValueError)          nexus.settings: a setting is wrong; the message names it
    │   ├── KafkaAccessError                   nexus.kafka.clients: credentials or TLS refused
    │   └── TemplateError                      streams.answering.prompt: worker.prompt_template
    ├── KafkaUnavailableError                  nexus.kafka.topics: no broker answered in time
    ├── TopicCreationError                     nexus.kafka.topics: Kafka refused to create a topic
    ├── TopicMissingError                      nexus.kafka.readers: a topic Nexus reads does not exist
    ├── AccessError                            nexus.access: an API key was refused
    │   ├── Unauthenticated
    │   └── Forbidden
    ├── SchemaError (also ValueError)          schemas: bytes that are not a Nexus record
    ├── RejectedRequest (also ValueError)      schemas.validation: a request body breaks the contract
    ├── BackendError                           streams.backends: a model backend failed a call
    ├── ProducerError                          producers.client: the producer API
    │   ├── SubmitError                        a request was not accepted by Kafka
    │   └── ResponseTimeout                    no answer in time
    ├── ReplyReaderError                       producers.replies: answers cannot be read
    ├── BridgeStartError                       consumers.bridge: the bridge cannot start
    ├── ReplayError                            consumers.replay: a replay cannot be done as asked
    │   └── ReplayKafkaError                   Kafka refused or did not answer
    ├── HistoryError                           consumers.bridge: a session's history cannot be read
    └── LocalKafkaError                        localdev.broker: the local broker failed to start

The "also" bases are kept where users already catch them (a bad setting has always
been a ``ValueError``). Errors that are a client's fault are answered, not raised:
the gateway and the bridge turn them into 4xx bodies and error frames.
"""

from __future__ import annotations

__all__ = ["NexusError"]


class NexusError(Exception):
    """Something Nexus detected and can explain; the message says what to do about it."""
