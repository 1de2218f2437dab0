"""Operations courier orchestrates; ``create-mailbox`` is the reference one."""

from . import create_mailbox

OPERATIONS = {create_mailbox.NAME: create_mailbox}

__all__ = ["OPERATIONS", "create_mailbox"]
