"""LLM providers, chosen per configured provider by its ``api``."""

from __future__ import annotations

from typing import assert_never

from clawbus.config import ProviderConfig

from .anthropic_messages import AnthropicMessagesProvider
from .base import Provider
from .echo import EchoProvider
from .openai_completions import OpenAICompletionsProvider

OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
ANTHROPIC_DEFAULT_BASE_URL = "https://api.anthropic.com/v1"

__all__ = ["ANTHROPIC_DEFAULT_BASE_URL", "OPENAI_DEFAULT_BASE_URL", "Provider", "make_provider"]


def make_provider(cfg: ProviderConfig, api_key: str | None) -> Provider:
    """Build the provider for one configured entry of ``models.providers``."""
    if cfg.api == "echo":
        return EchoProvider(cfg.token_delay_ms)
    if cfg.api == "openai-completions":
        return OpenAICompletionsProvider(
            base_url=cfg.base_url or OPENAI_DEFAULT_BASE_URL,
            api_key=api_key,
            headers=dict(cfg.headers),
            timeout_seconds=cfg.timeout_seconds,
            connect_timeout_seconds=cfg.connect_timeout_seconds,
        )
    if cfg.api == "anthropic-messages":
        return AnthropicMessagesProvider(
            base_url=cfg.base_url or ANTHROPIC_DEFAULT_BASE_URL,
            api_key=api_key,
            headers=dict(cfg.headers),
            timeout_seconds=cfg.timeout_seconds,
            connect_timeout_seconds=cfg.connect_timeout_seconds,
        )
    assert_never(cfg.api)
