"""The test suite's references live in the package (``make gpu-check`` uses them too)."""

from vtoken.testing import (
    ORACLE,
    FixedDrop,
    key_masks,
    masked_reference,
    random_schedule,
    schedule_for,
)

__all__ = ["ORACLE", "FixedDrop", "key_masks", "masked_reference", "random_schedule", "schedule_for"]
