"""The well-known credential variables of the agent engines.

The probe reports each that is set as ``cred:<name lower-case>`` (presence only, never the
value), and an engine's default :meth:`~gigafactory.factory.engines.base.Engine.credential_vars`
is all of them. Its own module so that the engines and the probe (which imports the engines)
both read it without importing each other.
"""

from __future__ import annotations

CREDENTIAL_VARS: tuple[str, ...] = (
    "ANTHROPIC_API_KEY",
    "OPENAI_API_KEY",
    "GEMINI_API_KEY",
    "GOOGLE_API_KEY",
    "GITHUB_TOKEN",
    "GH_TOKEN",
    "COPILOT_TOKEN",
    "AWS_ACCESS_KEY_ID",
)
"""Reported by the probe by presence as ``cred:<name lower-case>``."""
