"""Responses API affinity: a follow-up naming `previous_response_id` reaches the replica that stored it.

vLLM keeps `/v1/responses` state (the stored response, its messages, background events) in
the API server process that produced it (vllm/entrypoints/openai/responses/serving.py,
`response_store`, vLLM 0.32), so a follow-up routed to another replica answers 404
"Response with id ... not found" (ray-project/ray#65773). No shared store here: the
response id itself says where the state lives.

vLLM takes the response id from the request's `request_id` field (an extra parameter of
its ResponsesRequest, default `resp_<uuid>`, the `id` of the response it returns). So the
gateway sets `request_id` on each `POST /v1/responses` to an id naming the replica it sends
the request to; the client sees that id as the response's id, and the replica stores it
under that same id: nothing in the response is rewritten (the stream is relayed as it is,
pump included), and nothing is restored upstream.

The id: `resp_` + base64url(nonce[12] | replica_id XOR keystream | MAC[12]): the replica id
is encrypted (HMAC-SHA256 in counter mode as the keystream) and authenticated
(HMAC-SHA256 over nonce and ciphertext, truncated to 96 bits) with the cluster secret, so
any gateway sharing it can read it (`--cluster-secret`), a client cannot forge one naming a
replica of its choice, and the ids reveal nothing about the deployment. An id that does
not authenticate is not ours (vLLM's own, another cluster's): the request is routed as
usual. An id that authenticates but names a replica no longer in its app's target set:
404 `response_replica_gone`, instead of the wrong replica's confusing "not found".

Which requests: `POST .../v1/responses` (tagged; pinned when it names a
`previous_response_id` of ours), `GET .../v1/responses/{id}` and
`POST .../v1/responses/{id}/cancel` (pinned). A client that sets `request_id` itself keeps
it (no tag). Streams of the Responses API are relayed like any stream (backpressure, idle
timeout, a client abort cancels generation) but never resumed: resume.py only continues
/v1/completions and /v1/chat/completions, whose token ids it can replay, and the stored
response could not be split across two replicas anyway.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from typing import Any

import orjson

from gateway.observability.usage import json_object

RESPONSES = b"/v1/responses"
_NONCE = 12
_MAC = 12
_PREFIX = "resp_"


class Affinity:
    """The tag codec, one per gateway process; `plan` per request."""

    def __init__(self, secret: bytes):
        self._key_enc = hmac.new(secret, b"gateway responses affinity: encryption", hashlib.sha256).digest()
        self._key_mac = hmac.new(secret, b"gateway responses affinity: authentication", hashlib.sha256).digest()

    def _keystream(self, nonce: bytes, size: int) -> bytes:
        blocks = []
        for counter in range((size + 31) // 32):
            blocks.append(hmac.new(self._key_enc, nonce + counter.to_bytes(4, "big"), hashlib.sha256).digest())
        return b"".join(blocks)[:size]

    def _mac(self, nonce: bytes, sealed: bytes) -> bytes:
        return hmac.new(self._key_mac, nonce + sealed, hashlib.sha256).digest()[:_MAC]

    def new_id(self, replica_id: str) -> str:
        """A fresh response id that names `replica_id` (unique: a random nonce per id)."""
        plain = replica_id.encode("utf-8")
        nonce = os.urandom(_NONCE)
        sealed = bytes(a ^ b for a, b in zip(plain, self._keystream(nonce, len(plain))))
        raw = nonce + sealed + self._mac(nonce, sealed)
        return _PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    def replica_of(self, response_id: object) -> str | None:
        """The replica an id of ours names; None for anything else (not ours, tampered, not a string)."""
        if not isinstance(response_id, str) or not response_id.startswith(_PREFIX) or len(response_id) > 1024:
            return None
        text = response_id[len(_PREFIX):]
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except ValueError:
            return None
        if len(raw) <= _NONCE + _MAC or base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != text:
            return None  # too short, or not the one spelling we make (a last character's unused bits changed)
        nonce, sealed, mac = raw[:_NONCE], raw[_NONCE:-_MAC], raw[-_MAC:]
        if not hmac.compare_digest(mac, self._mac(nonce, sealed)):
            return None
        plain = bytes(a ^ b for a, b in zip(sealed, self._keystream(nonce, len(sealed))))
        try:
            return plain.decode("utf-8")
        except UnicodeDecodeError:
            return None

    def plan(self, method: bytes, path: bytes, body: bytes) -> "ResponsesRequest | None":
        """What affinity does for this request, or None when it is not a Responses API request it concerns."""
        at = path.find(RESPONSES)
        if at < 0:
            return None
        rest = path[at + len(RESPONSES):]
        if not rest:
            if method != b"POST":
                return None
            document = json_object(body)
            if document is None:
                return None
            pinned = self.replica_of(document.get("previous_response_id"))
            tag = "request_id" not in document  # a client's own request_id is kept: no affinity for it
            return ResponsesRequest(self, pinned, document if tag else None)
        # GET /v1/responses/{id}, POST /v1/responses/{id}/cancel: the id is the next path segment.
        if rest[:1] != b"/":
            return None
        response_id = rest[1:].split(b"/", 1)[0].decode("latin-1")
        pinned = self.replica_of(response_id)
        return ResponsesRequest(self, pinned, None) if pinned is not None else None


class ResponsesRequest:
    """One request's affinity: the replica it must go to (`pinned`), and its body to tag with an id."""

    __slots__ = ("affinity", "pinned", "document", "tagged_for")

    def __init__(self, affinity: Affinity, pinned: str | None, document: dict[str, Any] | None):
        self.affinity = affinity
        self.pinned = pinned
        self.document = document
        self.tagged_for: str | None = None

    def body_for(self, replica_id: str) -> bytes | None:
        """The request body naming a fresh response id for this replica; None: send the body as it is."""
        document = self.document
        if document is None or self.tagged_for == replica_id:
            return None
        document["request_id"] = self.affinity.new_id(replica_id)
        self.tagged_for = replica_id
        return orjson.dumps(document)
