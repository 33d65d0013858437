"""The Flask app that speaks the Docker volume plugin protocol.

dockerd POSTs JSON to ``/Plugin.Activate`` and ``/VolumeDriver.*`` without a
JSON content type, so bodies are parsed whatever the Content-Type header.
Every response is JSON of type ``application/vnd.docker.plugins.v1.1+json``; a
failure is ``{"Err": "one sentence"}``, never a traceback or an HTML page.
This module decodes requests and encodes answers; the work is done by
``driver.VolumeDriver``.
"""

import json
import logging
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Flask, Response, current_app, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from securevol.authz import Authorizer, Verdict, build_authorizer
from securevol.config import Settings
from securevol.driver import VolumeDriver
from securevol.errors import SecurevolError, VolumeNotFound

log = logging.getLogger(__name__)

MEDIA_TYPE = "application/vnd.docker.plugins.v1.1+json"

# dockerd's requests are a few hundred bytes; anything much larger is not from it.
MAX_REQUEST_BYTES = 1024 * 1024
# An AuthZRes carries a request body and a response body of up to 1 MiB each, base64-encoded.
AUTHZ_MAX_REQUEST_BYTES = 4 * 1024 * 1024

volume_api = Blueprint("volume_api", __name__)


class BadRequest(Exception):
    """A request that is not valid JSON or lacks a field of the right type; the message goes to the caller."""


def create_app(settings: Settings, driver: VolumeDriver | None = None) -> Flask:
    """Build the plugin's Flask app around *driver*, or around a driver built from *settings*."""
    app = Flask("securevol")
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    # Plugin subsystems announced by /Plugin.Activate; other parts of securevol
    # append to this list when they register their endpoints.
    app.config["SECUREVOL_IMPLEMENTS"] = ["VolumeDriver", "authz"]
    driver = driver or VolumeDriver.from_settings(settings)
    app.extensions["securevol.driver"] = driver
    app.extensions["securevol.authz"] = build_authorizer(settings, driver.registry)

    app.register_blueprint(volume_api)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    return app


def plugin_response(payload: dict[str, Any], status: int = 200) -> Response:
    """Encode *payload* as a plugin protocol response."""
    return Response(json.dumps(payload), status=status, mimetype=MEDIA_TYPE)


def error_response(message: str, status: int) -> Response:
    return plugin_response({"Err": message}, status)


def request_object() -> dict[str, Any]:
    """Return the request body as a JSON object; an empty body or ``null`` counts as ``{}``."""
    body = request.get_data(cache=True)
    limit = request.max_content_length
    if request.content_length is None and limit is not None and len(body) >= limit:
        # A chunked body is cut at the limit without an error; the rest is still unread.
        raise RequestEntityTooLarge()
    if not body.strip():
        return {}
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        # RecursionError: arrays or objects nested thousands deep.
        raise BadRequest("The request body is not valid JSON.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BadRequest("The request body must be a JSON object.")
    return data


def _string_field(data: dict[str, Any], field: str) -> str:
    value = data.get(field)
    if value is None:
        raise BadRequest(f"The request has no {field!r} field.")
    if not isinstance(value, str):
        raise BadRequest(f"The request's {field!r} field must be a string.")
    return value


def _mount_id(data: dict[str, Any]) -> str:
    mount_id = _string_field(data, "ID")
    if not mount_id:
        raise BadRequest("The request's 'ID' field is empty; send the ID that the mount is counted under.")
    return mount_id


def _driver() -> VolumeDriver:
    return current_app.extensions["securevol.driver"]


def _endpoint(path: str) -> Callable[[Callable[[], dict[str, Any]]], Callable[[], Response]]:
    """Register a POST handler that returns a payload, turning known errors into ``{"Err": ...}``."""

    def register(handler: Callable[[], dict[str, Any]]) -> Callable[[], Response]:
        def view() -> Response:
            log.debug("request endpoint=%s", path)
            try:
                return plugin_response(handler())
            except BadRequest as exc:
                log.info("request rejected endpoint=%s error=%s", path, exc)
                return error_response(str(exc), 400)
            except VolumeNotFound as exc:
                # dockerd calls Get for every name it is about to create, and every dockerd
                # on the host queries its own volume names, so this is routine, not a failure.
                log.debug("volume not found endpoint=%s error=%s", path, exc)
                return error_response(str(exc), 500)
            except SecurevolError as exc:
                log.info("request failed endpoint=%s error=%s", path, exc)
                return error_response(str(exc), 500)

        # Without automatic OPTIONS, every other method gets the same JSON error.
        volume_api.add_url_rule(
            path, endpoint=handler.__name__, view_func=view, methods=["POST"], provide_automatic_options=False
        )
        return view

    return register


@_endpoint("/Plugin.Activate")
def activate() -> dict[str, Any]:
    return {"Implements": list(current_app.config["SECUREVOL_IMPLEMENTS"])}


@_endpoint("/VolumeDriver.Create")
def create() -> dict[str, Any]:
    data = request_object()
    opts = data.get("Opts")
    if opts is not None and not isinstance(opts, dict):
        raise BadRequest("The request's 'Opts' field must be a JSON object of strings.")
    _driver().create(_string_field(data, "Name"), opts)
    return {"Err": ""}


@_endpoint("/VolumeDriver.Remove")
def remove() -> dict[str, Any]:
    _driver().remove(_string_field(request_object(), "Name"))
    return {"Err": ""}


@_endpoint("/VolumeDriver.Mount")
def mount() -> dict[str, Any]:
    data = request_object()
    mountpoint = _driver().mount(_string_field(data, "Name"), _mount_id(data))
    return {"Mountpoint": mountpoint, "Err": ""}


@_endpoint("/VolumeDriver.Unmount")
def unmount() -> dict[str, Any]:
    data = request_object()
    _driver().unmount(_string_field(data, "Name"), _mount_id(data))
    return {"Err": ""}


@_endpoint("/VolumeDriver.Path")
def path() -> dict[str, Any]:
    return {"Mountpoint": _driver().path(_string_field(request_object(), "Name")), "Err": ""}


@_endpoint("/VolumeDriver.Get")
def get() -> dict[str, Any]:
    return {"Volume": _driver().get(_string_field(request_object(), "Name")), "Err": ""}


@_endpoint("/VolumeDriver.List")
def list_volumes() -> dict[str, Any]:
    request_object()  # rejects a malformed body although no field is needed
    return {"Volumes": _driver().list(), "Err": ""}


@_endpoint("/VolumeDriver.Capabilities")
def capabilities() -> dict[str, Any]:
    request_object()
    return {"Capabilities": _driver().capabilities()}


def _authz_endpoint(path: str, answer: Callable[[Authorizer, dict[str, Any]], Verdict]) -> None:
    """Register an authorization plugin endpoint; a request it cannot read gets Err, which dockerd treats as a denial."""

    def view() -> Response:
        request.max_content_length = AUTHZ_MAX_REQUEST_BYTES
        try:
            payload = request_object()
        except BadRequest as exc:
            log.warning("authz request rejected endpoint=%s error=%s", path, exc)
            return plugin_response({"Allow": False, "Err": str(exc)}, 400)
        return plugin_response(answer(current_app.extensions["securevol.authz"], payload).to_response())

    volume_api.add_url_rule(
        path,
        endpoint=path.lstrip("/").replace(".", "_"),
        view_func=view,
        methods=["POST"],
        provide_automatic_options=False,
    )


_authz_endpoint("/AuthZPlugin.AuthZReq", lambda authorizer, payload: authorizer.authorize_request(payload))
_authz_endpoint("/AuthZPlugin.AuthZRes", lambda authorizer, payload: authorizer.authorize_response(payload))


def _http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    if status == 404:
        message = f"Unknown endpoint {request.path}; this plugin serves the Docker volume plugin protocol."
    elif status == 405:
        message = f"Method {request.method} is not allowed on {request.path}; use POST."
    elif status == 413:
        message = f"The request body is larger than {request.max_content_length or MAX_REQUEST_BYTES} bytes."
    else:
        message = f"The request failed: {exc.name}."
    return error_response(message, status)


def _unexpected_error(exc: Exception) -> Response:
    if isinstance(exc, HTTPException):
        return _http_error(exc)
    log.exception("request crashed endpoint=%s", request.path)
    return error_response("The securevol plugin hit an internal error; see its log for details.", 500)
