"""An OpenAI-compatible HTTP endpoint on the client's machine, generating through the split.

``fedsea openai`` serves ``/v1/models``, ``/v1/chat/completions`` and ``/v1/completions`` on
loopback (by default): a program that speaks OpenAI's API (the ``openai`` package, curl, an
editor plugin) talks to a fine-tuned split model as to any hosted one, while the text never
leaves the machine: tokenization, head, tail and sampling run here, and only the head's noised
hidden states go to the trunk server. Modules:

- ``protocol``: OpenAI's request and response shapes, checked; its error object (no model, no network).
- ``settings``: the endpoint's settings, the API key and the loopback rule (light, for ``--help``).
- ``engine``: ``SplitEngine``, requests answered by fedsea's generation loop over a ``SplitClient``.
- ``app``: the FastAPI routes, server-sent events, disconnects; uvicorn.

Nothing here is imported by ``import fedsea``: FastAPI and uvicorn load only for the endpoint.
"""
