"""AMQP 1.0: pure translation of error conditions and CBS answers, and their wire forms for an emulator.

Importing this package does not import proton: the translator reads conditions by duck typing.
"""

from __future__ import annotations

from adapters.amqp.translate import (
    CONDITIONS,
    ConditionLike,
    RenderedCondition,
    render,
    translate,
    translate_cbs,
)

__all__ = ["CONDITIONS", "ConditionLike", "RenderedCondition", "render", "translate", "translate_cbs"]
