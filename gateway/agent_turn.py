"""Validating an ``agent`` turn as the WebSocket protocol and ``clawbus agent``
send it (``{message, agentId?, sessionKey?, extraSystemPrompt?, images?}``) into
the same :class:`~gateway.runs.RunSpec` the HTTP endpoint produces.

Images are checked for shape here (:func:`image_sources`) and resolved by the
caller with the chat endpoint's :class:`~gateway.images.ImageResolver` (the same
limits, MIME types and URL policy as ``/v1/chat/completions``);
:func:`with_images` then puts them into the run."""

from __future__ import annotations

import dataclasses
from typing import Any

from bus.messages import ChatItem, ImagePart
from clawbus.config import AGENT_ID_RE, Settings

from .chat_request import MAX_SESSION_KEY, RESERVED_SESSION_KEY, is_reserved_session_key
from .errors import invalid_request
from .images import MAX_IMAGES, ImageSource
from .runs import RunSpec

IMAGES_SHAPE = "an array of image URLs or {url, detail?} objects"
IMAGE_ENTRY = "a data URI or an http(s) URL, or an object {url, detail?}"


def main_session_key(agent_id: str) -> str:
    """An agent's default conversation (as OpenClaw's ``agent`` command uses)."""
    return f"agent:{agent_id}:main"


def agent_turn(params: Any, settings: Settings) -> RunSpec:
    """Raises ApiError (400) on the first invalid field. ``message`` may be empty
    only when ``images`` holds at least one image; the images themselves are not
    in the spec (see :func:`image_sources` and :func:`with_images`)."""
    if not isinstance(params, dict):
        raise invalid_request("`params` must be an object.")
    message = params.get("message", "")
    if not isinstance(message, str):
        raise invalid_request("`message` must be a string.")
    if not message.strip() and not image_sources(params):
        raise invalid_request("`message` must be a non-empty string.")
    raw_agent = params.get("agentId")
    if raw_agent is None:
        agent_id = settings.default_agent_id
    elif isinstance(raw_agent, str):
        agent_id = raw_agent.strip().lower()
        if not AGENT_ID_RE.match(agent_id) or settings.agent(agent_id) is None:
            raise invalid_request(f"Unknown agent '{agent_id}'.")
    else:
        raise invalid_request("`agentId` must be a string.")
    raw_key = params.get("sessionKey")
    if raw_key is None or (isinstance(raw_key, str) and not raw_key.strip()):
        session_key = main_session_key(agent_id)
    elif isinstance(raw_key, str):
        session_key = raw_key.strip()
        if len(session_key) > MAX_SESSION_KEY:
            raise invalid_request(f"`sessionKey` is longer than {MAX_SESSION_KEY} characters.")
        if is_reserved_session_key(session_key):
            raise invalid_request(RESERVED_SESSION_KEY.replace(
                "`x-openclaw-session-key`", "`sessionKey`"))
    else:
        raise invalid_request("`sessionKey` must be a string.")
    extra = params.get("extraSystemPrompt", "")
    if extra is None:
        extra = ""
    if not isinstance(extra, str):
        raise invalid_request("`extraSystemPrompt` must be a string.")
    return RunSpec(agent_id=agent_id, session_key=session_key, message=message.strip(),
                   extra_system_prompt=extra)


def image_sources(params: dict[str, Any]) -> tuple[ImageSource, ...]:
    """The turn's ``images`` (absent, null or ``[]``: none), each named ``images[i]``
    for errors. Raises ApiError (400) on a wrong shape; whether a URL is usable is
    for the resolver to say."""
    raw = params.get("images")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise invalid_request(f"`images` must be {IMAGES_SHAPE}.")
    if len(raw) > MAX_IMAGES:
        raise invalid_request(f"`images` holds {len(raw)} images; at most {MAX_IMAGES} a turn.")
    sources = []
    for i, entry in enumerate(raw):
        where = f"images[{i}]"
        url, detail = (entry.get("url"), entry.get("detail")) if isinstance(entry, dict) \
            else (entry, None)
        if not isinstance(url, str) or not url.strip():
            raise invalid_request(f"`{where}` must be {IMAGE_ENTRY}.")
        if detail is not None and not isinstance(detail, str):
            raise invalid_request(f"`{where}.detail` must be a string.")
        sources.append(ImageSource(where, url.strip(), detail))
    return tuple(sources)


def with_images(spec: RunSpec, images: tuple[ImagePart, ...]) -> RunSpec:
    """``spec`` with its resolved images: the model gets the text and the images as
    one user item; the transcript's text form (``message``) names each image by
    its placeholder (``[image: image/png, 182 KB]``), never its bytes."""
    if not images:
        return spec
    item = ChatItem(role="user", text=spec.message, images=images)
    return dataclasses.replace(spec, message=item.stored().text, input=(item,))
