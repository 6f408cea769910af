"""The OpenAI-compatible routes (FastAPI) over the engine loop the gRPC front uses.

    POST /v1/completions        POST /v1/chat/completions        GET /v1/models
    GET /health                 GET /metrics (Prometheus, when the server has metrics)

`/v1/*` needs `Authorization: Bearer KEY` when the front has an API key (401 otherwise). Errors are
OpenAI's error object: 400 naming the parameter, 404 for an unknown model, 429 when the front already
has its maximum of requests in flight, 503 when the engine is not serving. A client that disconnects
(unary or streaming) cancels its requests, which frees their KV blocks at the next step boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from common.errors import InvalidRequest
from serving.engine.loop import EngineDead
from serving.http.protocol import OpenAIError, Plan, bad, chat_plan, completion_plan
from serving.http.responses import SSE_DONE, ResponseBuilder, sse
from serving.http.streams import AsyncRequestStream
from serving.limits import ServerFull

log = logging.getLogger(__name__)


def build_app(front) -> FastAPI:
    """`front` is a serving.http.server.HttpFront: loop, codec, names, api key, metrics, limits."""
    app = FastAPI(title="tandem", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, err: OpenAIError):
        return JSONResponse(err.body(), status_code=err.status)

    def authorize(request: Request) -> None:
        if front.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), front.api_key.encode()):
            raise OpenAIError(401, "missing or wrong API key (Authorization: Bearer KEY)", type="authentication_error",
                              code="invalid_api_key")

    async def read_body(request: Request) -> dict:
        authorize(request)
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as err:
            raise OpenAIError(400, f"the body is not valid JSON: {err}") from None
        if not isinstance(body, dict):
            raise OpenAIError(400, "the body must be a JSON object")
        return body

    def check_model(body: dict) -> None:
        if body.get("model") not in front.model_aliases:
            raise OpenAIError(404, f"model {body.get('model')!r} is not served here (GET /v1/models lists it)",
                              param="model", code="model_not_found")

    @app.get("/health")
    async def health():
        if not front.serving():
            raise OpenAIError(503, "the engine is not serving", type="server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        if front.metrics is None:
            raise OpenAIError(404, "this server has no metrics")
        text, content_type = await asyncio.to_thread(front.metrics.render)
        return Response(text, media_type=content_type)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        version, origin = await front.weights()
        return {"object": "list", "data": [{
            "id": front.model_id, "object": "model", "created": front.created, "owned_by": "tandem",
            "root": front.model_path, "max_model_len": front.codec.max_model_len,
            "weight_version": version, "weight_origin": origin}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        plan = completion_plan(body, front.codec)
        check_model(body)
        return await generate(request, plan, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        plan = chat_plan(body, front.codec)
        check_model(body)
        return await generate(request, plan, chat=True)

    async def generate(request: Request, plan: Plan, chat: bool):
        if front.inflight >= front.max_inflight:
            raise OpenAIError(429, f"the server already has {front.inflight} requests in flight; retry later",
                              type="rate_limit_error", code="rate_limit_exceeded")
        try:
            front.limits.check_planned(plan.prompts, plan.params, front.codec.max_model_len, repeats=plan.n)
        except InvalidRequest as err:
            param = plan.openai_param(err.field)
            raise bad("prompt" if param == "prompts" else param, err.message) from None
        try:
            front.admission.take(plan.num_choices)
        except ServerFull as err:
            raise OpenAIError(429, str(err), type="rate_limit_error", code="rate_limit_exceeded") from None
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        stream = AsyncRequestStream([f"http-{request_id}-{k}" for k in range(plan.num_choices)],
                                    asyncio.get_running_loop())
        prompts = [p for p in plan.prompts for _ in range(plan.n)]
        try:
            front.loop.submit(stream, prompts, front.engine_params(plan))
        except EngineDead as err:
            front.admission.give_back(plan.num_choices)
            raise OpenAIError(503, str(err), type="server_error") from None
        front.inflight += 1

        def done() -> None:
            front.inflight -= 1
            front.admission.give_back(plan.num_choices)

        builder = ResponseBuilder(plan, front.codec, front.model_id, request_id, chat)
        outputs = stream.outputs()
        try:
            first = await anext(outputs)
        except asyncio.CancelledError:
            done()
            stream.cancel()
            raise
        except Exception as err:  # noqa: BLE001 - a refused prompt or a dead engine, answered as an error object
            done()
            stream.cancel()
            raise engine_error(plan, err) from None
        if plan.stream:
            return StreamingResponse(streamed(stream, outputs, first, builder, plan, done), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watch = asyncio.create_task(cancel_on_disconnect(request, stream))
        try:
            finals = [None] * plan.num_choices
            index, out = first
            finals[index] = out if out.finished else None
            async for index, out in outputs:
                if out.finished:
                    finals[index] = out
            if stream.cancelled:
                return Response(status_code=499)      # the client is gone; nobody reads this
            return builder.final(finals)
        except (InvalidRequest, EngineDead) as err:
            raise engine_error(plan, err) from None
        finally:
            done()
            watch.cancel()
            stream.cancel()

    async def streamed(stream, outputs, first, builder: ResponseBuilder, plan: Plan, done):
        started: set[int] = set()
        generated, version = 0, 0
        try:
            item = first
            while item is not None:
                index, out = item
                generated += len(out.new_token_ids)
                version = max(version, out.weight_version)
                if out.new_token_ids or out.new_text or out.finished or index not in started:
                    yield sse(builder.chunk(index, out, first=index not in started))
                    started.add(index)
                item = await anext(outputs, None)
            if plan.include_usage:
                yield sse(builder.usage_chunk(generated, version))
            yield SSE_DONE
        except (InvalidRequest, EngineDead) as err:       # headers are sent: the error goes in the stream
            yield sse(engine_error(plan, err).body())
            yield SSE_DONE
        finally:                                          # also when the client disconnects mid-stream
            done()
            stream.cancel()

    return app


async def cancel_on_disconnect(request: Request, stream: AsyncRequestStream) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                stream.cancel()
                return


def engine_error(plan: Plan, err: BaseException) -> OpenAIError:
    if isinstance(err, OpenAIError):
        return err
    if isinstance(err, InvalidRequest):
        return bad(plan.openai_param(err.field), err.message)
    if isinstance(err, EngineDead):
        return OpenAIError(503, str(err), type="server_error")
    if isinstance(err, StopAsyncIteration):
        return OpenAIError(503, "the request was cancelled before it produced output", type="server_error")
    log.exception("unexpected error in the HTTP front", exc_info=err)
    return OpenAIError(500, f"{type(err).__name__}: {err}", type="server_error")
