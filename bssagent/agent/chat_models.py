"""Chat models for examples and the demo: a real provider when a key is set, else offline.

:class:`OfflineChatModel` is deterministic and needs no network, so the demo, the examples
and the tests run anywhere and always print the same conversation.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

logger = logging.getLogger("bssagent.agent")

__all__ = ["OfflineChatModel", "default_chat_model"]


class OfflineChatModel(BaseChatModel):
    """A deterministic stand-in for a chat model: no network, no key, same answer every time.

    Its reply quotes the latest user message and counts the user's turns in the
    conversation it was given, so a reply such as ``turn 3`` proves the conversation's
    history reached the model (for example, after a process restart). System messages are
    echoed in brackets, so a reply shows what context (such as a user's memory) it got.
    """

    name_prefix: str = "offline"

    @property
    def _llm_type(self) -> str:
        return "bssagent-offline"

    def _reply(self, messages: Sequence[BaseMessage]) -> str:
        user_turns = [m for m in messages if isinstance(m, HumanMessage)]
        last = user_turns[-1].text if user_turns else ""
        quoted = last if len(last) <= 80 else last[:77] + "..."
        context = " ".join(m.text for m in messages if isinstance(m, SystemMessage))
        return (
            f"[{self.name_prefix} model] You said: {quoted!r}. "
            f"This is turn {len(user_turns)} of our conversation."
            + (f" [{context}]" if context else "")
        )

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=AIMessage(self._reply(messages)))])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        words = self._reply(messages).split(" ")
        for index, word in enumerate(words):
            text = word if index == len(words) - 1 else word + " "
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=text))
            if run_manager is not None:
                run_manager.on_llm_new_token(text, chunk=chunk)
            yield chunk


def default_chat_model() -> tuple[BaseChatModel, str]:
    """The chat model to use, and a one-line description of which one it is.

    Google Gemini when ``GOOGLE_API_KEY`` is set and ``langchain-google-genai`` is installed
    (extra ``google``), else OpenAI when ``OPENAI_API_KEY`` is set and ``langchain-openai``
    is installed (extra ``openai``), else :class:`OfflineChatModel`.
    """
    if os.environ.get("GOOGLE_API_KEY"):
        try:
            from langchain_google_genai import ChatGoogleGenerativeAI

            model = os.environ.get("BSSAGENT_GOOGLE_MODEL", "gemini-2.5-flash")
            return ChatGoogleGenerativeAI(model=model), f"Google Gemini ({model})"
        except ImportError:
            logger.warning("GOOGLE_API_KEY is set but langchain-google-genai is not installed")
    if os.environ.get("OPENAI_API_KEY"):
        try:
            from langchain_openai import ChatOpenAI

            model = os.environ.get("BSSAGENT_OPENAI_MODEL", "gpt-4o-mini")
            return ChatOpenAI(model=model), f"OpenAI ({model})"
        except ImportError:
            logger.warning("OPENAI_API_KEY is set but langchain-openai is not installed")
    return (
        OfflineChatModel(),
        "the offline model (deterministic, no network; set GOOGLE_API_KEY or OPENAI_API_KEY "
        "for a real one)",
    )
