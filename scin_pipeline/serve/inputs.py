"""Reading one prediction request: the upload under a size cap, in memory only, and the optional questionnaire.

- The body is counted while it streams in and refused (413) as soon as it passes ``max_upload_bytes``; a
  ``Content-Length`` over the cap is refused before a byte is read. Starlette's multipart parser (python-
  multipart underneath) does the parsing; its spool size is raised to the cap, so a file part, which can
  never be larger than the body, stays in memory and is never rolled over to a temporary file on disk.
- Content types: the request must be ``multipart/form-data`` (415 otherwise); the ``file`` part may declare
  ``image/png``, ``image/jpeg``, ``application/octet-stream`` or nothing (415 otherwise). What the bytes
  really are is decided by their signature, in the shared decoder (core.image_cache).
- The questionnaire: the case columns the metadata features are built from (``metadata_model``'s
  ``CATEGORICAL_COLUMNS`` and ``FLAG_GROUPS``, with ``schema.ENUM_VALUES`` as vocabularies), so the form
  cannot drift from the model's inputs. A categorical is one value (empty = not answered); a check-box group
  (``textures``, ``body_parts``, ``symptoms``) is a list of the ticked case columns, as repeated fields or
  comma-separated. Unknown fields or values are refused (422) rather than silently read as "not answered".

- Malformed bodies are 400 ``bad_multipart`` with a message for people: a body that ends without its
  closing boundary (``--BOUNDARY--``: cut off, or not multipart at all) and a part header over
  python-multipart's limit (4,224 bytes: e.g. a file name thousands of characters long) included.

Client file names are never read into anything that is logged or returned.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
from python_multipart.multipart import DEFAULT_MAX_HEADER_SIZE
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from scin_pipeline.core import schema
from scin_pipeline.core.metadata_model import CATEGORICAL_COLUMNS, FLAG_GROUPS
from scin_pipeline.core.questionnaire import blank_questionnaires

FILE_FIELD = "file"
ACCEPTED_PART_TYPES = ("image/png", "image/jpeg", "image/jpg", "application/octet-stream", "")
CHOICE_FIELDS: dict[str, list[str]] = {column: list(schema.ENUM_VALUES[column]) for column in CATEGORICAL_COLUMNS}
CHECKBOX_FIELDS: dict[str, list[str]] = {group: list(columns) for group, columns in FLAG_GROUPS.items()}
METADATA_FIELDS = (*CHOICE_FIELDS, *CHECKBOX_FIELDS)
_MAX_TEXT_FIELD_BYTES = 4096
_MAX_FIELDS = 64


class RequestError(Exception):
    """A request the service refuses: HTTP ``status``, a short ``error`` code and a message for people."""

    def __init__(self, status: int, error: str, detail: str):
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


@dataclass
class PredictionRequest:
    image: bytes | None
    metadata: dict[str, str | list[str]] = field(default_factory=dict)

    def cases(self) -> pd.DataFrame:
        """The questionnaire as one case row in the raw case columns (absent = not answered)."""
        row: dict[str, object] = {}
        for name, value in self.metadata.items():
            if name in CHOICE_FIELDS:
                row[name] = value
            else:
                row.update({column: True for column in value})
        # No answer at all: the blank form training's modality dropout used (core.questionnaire).
        return pd.DataFrame([row], index=[0]) if row else blank_questionnaires(1)


def metadata_field_descriptions() -> list[dict]:
    """The questionnaire for the page: name, whether several values may be ticked, the allowed values."""
    return [{"name": name, "multiple": False, "values": values} for name, values in CHOICE_FIELDS.items()] + [
        {"name": name, "multiple": True, "values": values} for name, values in CHECKBOX_FIELDS.items()
    ]


class _EndCheckingMultiPartParser(MultiPartParser):
    reached_end = False  # python-multipart saw the closing boundary (its finalize() does not check)

    def on_end(self) -> None:
        self.reached_end = True


def _in_memory_parser(cap: int) -> type[_EndCheckingMultiPartParser]:
    class InMemoryMultiPartParser(_EndCheckingMultiPartParser):
        # Above this size a SpooledTemporaryFile moves to disk; a part cannot outgrow the capped body.
        spool_max_size = cap + 1

    return InMemoryMultiPartParser


def _plain_multipart_problem(exc: MultiPartException) -> str:
    """What was wrong with the body, for people (never quoting the client's file name)."""
    cause = str(exc.__cause__ or "")
    if "header size" in cause.lower():
        return (
            f"a part header of the multipart body is too long (over {DEFAULT_MAX_HEADER_SIZE:,} bytes; usually a "
            "very long file name): rename the file to a shorter name and send it again"
        )
    if "header" in cause.lower() and "count" in cause.lower():
        return "a part of the multipart body has too many headers"
    reason = f": {cause}" if cause else f": {exc.message}"
    return f"the body is not valid multipart/form-data{reason}"


async def _capped_stream(request: Request, cap: int):
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > cap:
            raise RequestError(413, "too_large", f"upload is over the limit of {cap:,} bytes")
        yield chunk


def _declared_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        raise RequestError(400, "bad_request", f"Content-Length is not a number: {value[:40]!r}") from None
    if length < 0:
        raise RequestError(400, "bad_request", "Content-Length is negative")
    return length


def validated_metadata(fields: dict[str, list[str]]) -> dict[str, str | list[str]]:
    """The questionnaire answers in ``fields`` (form field -> its values), checked against the vocabularies;
    RequestError (422) naming the field for an unknown field or value. The form and ``predict --answers``
    both read answers through it."""
    unknown = sorted(set(fields) - set(METADATA_FIELDS))
    if unknown:
        raise RequestError(
            422,
            "unknown_field",
            f"unknown form field(s) {unknown}: the fields are `{FILE_FIELD}` and the optional {list(METADATA_FIELDS)}",
        )
    answers: dict[str, str | list[str]] = {}
    for name, values in fields.items():
        if name in CHOICE_FIELDS:
            given = [v.strip() for v in values if v.strip()]
            if len(given) > 1:
                raise RequestError(422, "invalid_metadata", f"{name}: one value expected, got {len(given)}")
            if given and given[0] not in CHOICE_FIELDS[name]:
                raise RequestError(
                    422, "invalid_metadata", f"{name}: {given[0][:60]!r} is not one of {CHOICE_FIELDS[name]}"
                )
            if given:
                answers[name] = given[0]
        else:
            ticked = [part.strip() for v in values for part in v.split(",") if part.strip()]
            wrong = [t[:60] for t in ticked if t not in CHECKBOX_FIELDS[name]]
            if wrong:
                raise RequestError(422, "invalid_metadata", f"{name}: {wrong} not among {CHECKBOX_FIELDS[name]}")
            if ticked:
                answers[name] = sorted(set(ticked), key=CHECKBOX_FIELDS[name].index)
    return answers


async def read_prediction_request(request: Request, *, max_upload_bytes: int) -> PredictionRequest:
    """Parse ``request`` (see the module docstring); raises :class:`RequestError`."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() != "multipart/form-data":
        raise RequestError(
            415,
            "unsupported_media_type",
            f"send the image as multipart/form-data with the field `{FILE_FIELD}` "
            f"(got Content-Type {content_type[:80] or 'none'!r})",
        )
    length = _declared_length(request)
    if length is not None and length > max_upload_bytes:
        raise RequestError(
            413, "too_large", f"upload of {length:,} bytes is over the limit of {max_upload_bytes:,} bytes"
        )
    parser = _in_memory_parser(max_upload_bytes)(
        request.headers,
        _capped_stream(request, max_upload_bytes),
        max_files=1,
        max_fields=_MAX_FIELDS,
        max_part_size=_MAX_TEXT_FIELD_BYTES,
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise RequestError(400, "bad_multipart", _plain_multipart_problem(exc)) from None
    if not parser.reached_end:
        await form.close()
        raise RequestError(
            400,
            "bad_multipart",
            "the multipart body ends before its closing boundary: the upload was cut off or is not "
            "multipart/form-data; send it again",
        )
    try:
        image: bytes | None = None
        fields: dict[str, list[str]] = {}
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name != FILE_FIELD:
                    raise RequestError(422, "unknown_field", f"files go in the field `{FILE_FIELD}`, got {name!r}")
                part_type = (value.content_type or "").split(";", 1)[0].strip().lower()
                if part_type not in ACCEPTED_PART_TYPES:
                    raise RequestError(
                        415, "unsupported_media_type", f"upload is declared {part_type[:60]!r}; PNG or JPEG images only"
                    )
                data = await value.read()
                # A browser form with no file chosen sends an empty part without a file name: no upload.
                image = None if not data and not value.filename else data
            elif name == FILE_FIELD:
                raise RequestError(
                    422, "missing_file", f"`{FILE_FIELD}` must be a file part (an image), not a text field"
                )
            else:
                fields.setdefault(name, []).append(value)
    finally:
        await form.close()
    return PredictionRequest(image=image, metadata=validated_metadata(fields))
