"""An interaction's wire format (Discord API v10): the parts we read, as pydantic models, and what we answer.

Only `type` must be right for a document to count as an interaction. Every other field is read
leniently: a field of the wrong shape reads as absent, so a command missing who sent it, or its
attachment, gets a polite reply that says so rather than a 400.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Final, TypeVar

from pydantic import (
    BaseModel,
    PlainValidator,
    StrictInt,
    StrictStr,
    StringConstraints,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)

# Interaction types
PING: Final = 1
APPLICATION_COMMAND: Final = 2
AUTOCOMPLETE: Final = 4
# Response types and flags
PONG: Final = 1
CHANNEL_MESSAGE_WITH_SOURCE: Final = 4
DEFERRED_CHANNEL_MESSAGE_WITH_SOURCE: Final = 5
AUTOCOMPLETE_RESULT: Final = 8
EPHEMERAL: Final = 1 << 6
# Content may echo user input (a filename, a notes field): never let it ping anyone.
NO_MENTIONS: Final[Mapping[str, list[str]]] = {"parse": []}

JsonObject = dict[str, object]

T = TypeVar("T")


def _absent_if_invalid(value: object, handler: ValidatorFunctionWrapHandler) -> object:
    try:
        return handler(value)
    except ValidationError:
        return None


# A field that reads as None when it is missing or has the wrong shape.
Lenient = Annotated[T | None, WrapValidator(_absent_if_invalid)]
Text = Annotated[StrictStr, StringConstraints(min_length=1)]


def _snowflake(value: object) -> int:
    """Snowflakes arrive as strings of digits and fit in 64 bits."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 20 and int(value) < 2**64:
        return int(value)
    raise ValueError("not a snowflake")


Snowflake = Annotated[int, PlainValidator(_snowflake)]


class User(BaseModel):
    id: Lenient[Snowflake] = None


class Member(BaseModel):
    user: Lenient[User] = None


class Option(BaseModel):
    name: StrictStr
    value: object = None


class Attachment(BaseModel):
    url: StrictStr
    size: Lenient[StrictInt] = None


class Resolved(BaseModel):
    attachments: Lenient[dict[str, Lenient[Attachment]]] = None


class CommandData(BaseModel):
    name: Lenient[Text] = None
    options: Lenient[list[Lenient[Option]]] = None
    resolved: Lenient[Resolved] = None

    def option_values(self) -> dict[str, object]:
        """Option name -> value (options of the wrong shape are left out; the last of a name wins)."""
        return {option.name: option.value for option in self.options or () if option is not None}

    def attachment(self, option: str) -> Attachment | None:
        """The attachment an option names, looked up in `resolved.attachments`."""
        attachment_id = self.option_values().get(option)
        attachments = self.resolved.attachments if self.resolved is not None else None
        if not isinstance(attachment_id, str) or attachments is None:
            return None
        return attachments.get(attachment_id)


class Interaction(BaseModel):
    type: StrictInt
    id: Lenient[Text] = None
    token: Lenient[Text] = None
    member: Lenient[Member] = None  # in a guild
    user: Lenient[User] = None  # in DMs
    data: Lenient[CommandData] = None

    @property
    def user_id(self) -> int | None:
        """`member.user.id` in a guild, `user.id` in DMs."""
        user = self.member.user if self.member is not None else self.user
        return user.id if user is not None else None

    @property
    def command(self) -> CommandData:
        return self.data if self.data is not None else CommandData()


@dataclass(frozen=True)
class Reply:
    status: int
    body: JsonObject
    # Runs after the answer is on its way to Discord (follow-ups must not race the initial response).
    background: Callable[[], Awaitable[None]] | None = None


def message(content: str) -> JsonObject:
    """An ephemeral message (only the user who asked sees it) that pings no one."""
    data: JsonObject = {"content": content[:2000], "allowed_mentions": dict(NO_MENTIONS), "flags": EPHEMERAL}
    return {"type": CHANNEL_MESSAGE_WITH_SOURCE, "data": data}


def say(content: str) -> Reply:
    return Reply(200, message(content))


def error(status: int, code: str, text: str, request_id: str) -> Reply:
    """An HTTP-level refusal in the API's error envelope."""
    return Reply(status, {"code": code, "message": text, "request_id": request_id})
