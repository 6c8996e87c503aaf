"""The agent's wire protocol: JSON lines over a Unix socket.

Only the errors are re-exported here, so that importing ``rpc.client`` (agentctl) stays cheap;
import ``rpc.server``, ``rpc.messages`` and ``rpc.framing`` explicitly.
"""

from rpc.errors import (
    CODE_DECODE,
    CODE_INTERNAL,
    CODE_PERMISSION_DENIED,
    CODE_TRY_AGAIN,
    CODE_UNKNOWN_METHOD,
    AddressInUse,
    AgentTimeout,
    AgentUnreachable,
    DecodeError,
    FrameDecodeError,
    FrameTooLarge,
    NotASocket,
    ProtocolError,
    RpcError,
)

__all__ = [
    "CODE_DECODE",
    "CODE_INTERNAL",
    "CODE_PERMISSION_DENIED",
    "CODE_TRY_AGAIN",
    "CODE_UNKNOWN_METHOD",
    "AddressInUse",
    "AgentTimeout",
    "AgentUnreachable",
    "DecodeError",
    "FrameDecodeError",
    "FrameTooLarge",
    "NotASocket",
    "ProtocolError",
    "RpcError",
]
