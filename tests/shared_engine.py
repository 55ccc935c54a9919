"""RAAS_BATCH_ENGINE=shared_engine:SharedLLM makes a job in this process use an LLM a test already
loaded (`SharedLLM.instance`), so CLI tests on the real model pay for one model load per session."""

from __future__ import annotations

from typing import ClassVar


class SharedLLM:
    instance: ClassVar[object] = None
    last_kwargs: ClassVar[dict] = {}

    def __new__(cls, **kwargs):
        cls.last_kwargs = kwargs
        return cls.instance
