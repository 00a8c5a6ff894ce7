"""Pydantic models of the Open Inference Protocol v2 bodies, so the OpenAPI document (/docs) shows them
and FastAPI can take them as `response_model`.

The infer path never parses with these: serve/protocol.py does, many times faster, and also reads
the binary tensor data extension, which no JSON schema can describe. `infer_openapi_extra()` puts
the request body's schema in a route's `openapi_extra`, so FastAPI documents the body without
reading it; `INFER_RESPONSES` documents the answers.
"""

import inspect
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, RootModel, StrictBool, StrictFloat, StrictInt, StrictStr

Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BF16", "BYTES",
]
"""Every datatype of the protocol (serve.tensors.DATATYPES)."""

# Strict, and bool first: a JSON true must not pass for the number 1.
Parameters = Dict[str, Union[StrictBool, StrictInt, StrictFloat, StrictStr]]
"""Extra settings of a request, tensor or response: string, number or boolean values."""

_DATA = ("The tensor's values, row major: flat, or nested to match the shape. Numbers for the FP and INT "
         "datatypes (FP16 and BF16 too), booleans for BOOL, strings for BYTES.")


class _Body(BaseModel):
    # Other keys (such as "model_name", which some clients send) are allowed, and ignored.
    model_config = ConfigDict(extra="allow")


class RequestInput(_Body):
    """An input tensor of an infer request."""

    name: str = Field(description="A declared input of the model.")
    shape: List[PositiveInt] = Field(min_length=1, description="Dimensions, the first being the rows (batch).")
    datatype: Datatype = Field(description="The declared datatype; an FP32 input also takes FP16, BF16 and FP64.")
    parameters: Optional[Parameters] = Field(
        default=None, description='"binary_data_size": the byte count of this tensor\'s binary data after the JSON '
                                  "(binary tensor data extension), in place of `data`.")
    data: Optional[List[Any]] = Field(default=None, description=_DATA)


class RequestOutput(_Body):
    """An output the request asks for."""

    name: str = Field(description="A declared output of the model.")
    parameters: Optional[Parameters] = Field(
        default=None, description='"binary_data": true to get this output as binary data after the JSON.')


class InferenceRequest(_Body):
    """An infer request: JSON alone, or with the binary tensor data extension the JSON's byte count in
    the Inference-Header-Content-Length header and each binary input's bytes after it, in order."""

    id: Optional[str] = Field(default=None, description="Echoed in the response.")
    parameters: Optional[Parameters] = Field(
        default=None, description='"binary_data_output": true to get every output as binary data.')
    inputs: List[RequestInput] = Field(min_length=1, description="Every input the model declares, once.")
    outputs: Optional[List[RequestOutput]] = Field(
        default=None, description="The outputs to return, in this order; absent for every output.")

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{
        "id": "request-1",
        "inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32", "data": [0.1, 0.2, 0.3, 0.4] * 2}],
        "outputs": [{"name": "label"}],
    }]})


class ResponseOutput(BaseModel):
    """An output tensor of an infer response."""

    name: str
    shape: List[int]
    datatype: Datatype
    parameters: Optional[Parameters] = Field(
        default=None, description='"binary_data_size": the byte count of this tensor\'s binary data after the JSON.')
    data: Optional[List[Any]] = Field(default=None, description=_DATA + " Absent for a binary output.")


class InferenceResponse(BaseModel):
    """An infer response: JSON alone, or with binary outputs the JSON's byte count in the
    Inference-Header-Content-Length header and each binary output's bytes after it, in order."""

    model_name: str
    model_version: Optional[str] = None
    id: Optional[str] = Field(default=None, description="The request's id.")
    parameters: Optional[Parameters] = None
    outputs: List[ResponseOutput]


class MetadataTensor(BaseModel):
    """A declared input or output of a model."""

    name: str
    datatype: Datatype
    shape: List[int] = Field(description="Dimensions, -1 for any size.")


class ModelMetadataResponse(BaseModel):
    """What a model takes and returns."""

    name: str
    versions: Optional[List[str]] = None
    platform: str
    inputs: List[MetadataTensor]
    outputs: List[MetadataTensor]


class ServerMetadataResponse(BaseModel):
    """What this server is and which protocol extensions it speaks."""

    name: str
    version: str
    extensions: List[str]


class LiveResponse(BaseModel):
    live: bool


class ReadyResponse(BaseModel):
    ready: bool


class ModelReadyResponse(BaseModel):
    name: str
    version: Optional[str] = None
    ready: bool


class ModelListResponse(BaseModel):
    """The models this server can serve."""

    models: List[str]


class RepositoryIndexEntry(BaseModel):
    """One model version in the model repository extension's index."""

    name: str
    version: Optional[str] = None
    state: Optional[str] = None
    reason: Optional[str] = None


class RepositoryIndex(RootModel[List[RepositoryIndexEntry]]):
    """The model repository extension's index."""


class ErrorResponse(BaseModel):
    """Every error, 4xx and 5xx."""

    error: str = Field(description="What is wrong.")


def infer_openapi_extra() -> Dict[str, Any]:
    """A route's `openapi_extra` documenting the infer request body (JSON, or JSON then binary data)
    and the Inference-Header-Content-Length header, without FastAPI reading the body."""
    return {
        "parameters": [{
            "name": "Inference-Header-Content-Length", "in": "header", "required": False,
            "description": "With binary tensor data: the byte count of the JSON that starts the body.",
            "schema": {"type": "integer", "minimum": 1},
        }],
        "requestBody": {
            "required": True,
            "description": inspect.getdoc(InferenceRequest),
            "content": {
                "application/json": {"schema": inline_schema(InferenceRequest)},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        },
    }


INFER_RESPONSES: Dict[Union[int, str], Dict[str, Any]] = {
    200: {"model": InferenceResponse, "description": "The outputs; with binary outputs the body is "
          "application/octet-stream, the JSON first (Inference-Header-Content-Length bytes), then the data.",
          "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
    **{status: {"model": ErrorResponse, "description": text} for status, text in (
        (400, "A malformed request, or one that does not fit the model's signature."),
        (413, "Too many rows, or a body too large."),
    )},
}
"""A route's `responses` for the infer routes (the app adds the statuses every route shares)."""


def inline_schema(model: type[BaseModel]) -> Dict[str, Any]:
    """`model`'s JSON schema with every `$ref` replaced by its definition: an OpenAPI document
    resolves "#/$defs/..." against its own root, where pydantic's definitions are not."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def resolved(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolved(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: resolved(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolved(item) for item in node]
        return node

    return resolved(schema)


def bearer_openapi(app: Any, open_paths: Sequence[str]) -> Callable[[], Dict[str, Any]]:
    """An `app.openapi` that adds the Bearer API-key scheme to the generated document and marks
    every operation outside `open_paths` as needing it (with its 401/403 answers), so /docs shows
    which routes take a key and lets a reader send one. Built once, on first use."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> Dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
                "type": "http", "scheme": "bearer",
                "description": "An API key (`python -m jobs.keys create`), sent as `Authorization: Bearer <key>`.",
            }
            for path, operations in schema["paths"].items():
                if path in open_paths:
                    continue
                for operation in operations.values():
                    operation["security"] = [{"bearer": []}]
                    for status, text in ((401, "No key, or a key that is unknown or revoked."),
                                         (403, "A key without the scope this route needs.")):
                        operation.setdefault("responses", {})[str(status)] = {
                            "description": text,
                            "content": {"application/json": {"schema": inline_schema(ErrorResponse)}},
                        }
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi
