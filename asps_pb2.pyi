from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ChallengeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Challenge(_message.Message):
    __slots__ = ("token", "expires_at")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    token: bytes
    expires_at: int
    def __init__(self, token: _Optional[bytes] = ..., expires_at: _Optional[int] = ...) -> None: ...

class SecretsRequest(_message.Message):
    __slots__ = ("evidence", "token", "names", "signature")
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    evidence: bytes
    token: bytes
    names: _containers.RepeatedScalarFieldContainer[str]
    signature: bytes
    def __init__(self, evidence: _Optional[bytes] = ..., token: _Optional[bytes] = ..., names: _Optional[_Iterable[str]] = ..., signature: _Optional[bytes] = ...) -> None: ...

class SecretsReply(_message.Message):
    __slots__ = ("app_id", "sealed")
    APP_ID_FIELD_NUMBER: _ClassVar[int]
    SEALED_FIELD_NUMBER: _ClassVar[int]
    app_id: str
    sealed: bytes
    def __init__(self, app_id: _Optional[str] = ..., sealed: _Optional[bytes] = ...) -> None: ...

class SecretBundle(_message.Message):
    __slots__ = ("secrets",)
    class SecretsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    SECRETS_FIELD_NUMBER: _ClassVar[int]
    secrets: _containers.ScalarMap[str, bytes]
    def __init__(self, secrets: _Optional[_Mapping[str, bytes]] = ...) -> None: ...
