"""``remoteloss.v1.LossService`` over gRPC: translates between the protocol and the server's
protocol-neutral pieces, and nothing else.

A request's bytes go through ``intake`` (parse, limits, a validated ``Call``), its place in the
in-flight budgets through ``limits.Admission``, its computation through the ``Batcher``, its
answer through ``framing``; a domain error becomes a status through ``status``. Compute and
ComputeStream take and give bytes (``add_to_server`` registers them without (de)serializers), which
lets a large request's tensors be read in place and every size be known without re-serializing.
A second protocol in front of the same server is a module beside this one, reusing all of these.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor as Pool
from typing import Any

import grpc
from google.protobuf.message import Message

from remoteloss import codec
from remoteloss.v1 import loss_pb2 as pb
from remoteloss.v1 import loss_pb2_grpc
from remoteloss_server import framing
from remoteloss_server.batcher import Batcher
from remoteloss_server.errors import ServiceError, UnimplementedError
from remoteloss_server.executor import Executor
from remoteloss_server.intake import Intake, Received, UndecodableRequest
from remoteloss_server.limits import Admission, Ticket
from remoteloss_server.losses import LOSSES, describe_all
from remoteloss_server.metrics import Metrics
from remoteloss_server.scheduling import SchedulingPolicy
from remoteloss_server.status import (
    add_trailing_metadata, caller_request_id, final, register, status_of, translate_errors,
)
from remoteloss_server.streaming import Stopped, bounded_map
from remoteloss_server.telemetry import REQUEST_ID_KEY, TENANT, RequestRecord, loss_label

__all__ = [
    "DRAINED_METADATA_KEY",
    "SERVICE_NAME",
    "WORKER_METADATA_KEY",
    "LossServicer",
    "add_to_server",
]

logger = logging.getLogger(__name__)

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["LossService"].full_name
WORKER_METADATA_KEY = "remoteloss-worker"  # trailing metadata: which worker process answered (--workers > 1)
# Trailing metadata of a ComputeStream that a drain ended (UNAVAILABLE): the answers it sent.
DRAINED_METADATA_KEY = "remoteloss-drained"


def add_to_server(servicer: LossServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer``: Compute and ComputeStream take and give bytes; ListLosses's
    deserializer lets undecodable bytes reach ``translate_errors`` (``status.register``)."""
    register(server, pb, SERVICE_NAME, servicer, _RAW_METHODS)


_RAW_METHODS = frozenset({"Compute", "ComputeStream"})


# A call cancelled this close to its deadline was cancelled by it: the caller's clock started the
# deadline before ours did (by the request's transit), so its cancel can arrive before our own
# deadline has passed.
_DEADLINE_SLACK_S = 0.02


class LossServicer(loss_pb2_grpc.LossServiceServicer):
    """Compute, ComputeStream and ListLosses. Each request is recorded in ``metrics`` (a private
    ``Metrics`` when none is given). ``worker``, the process's index under ``--workers``, is sent
    back as the trailing metadata ``remoteloss-worker`` of Compute and ComputeStream (nothing when
    None). With a ``batcher`` (the server's), calls go through it; without one (unit tests), each
    runs alone on ``pool``. ``admission`` bounds what is in flight (None: no bound)."""

    def __init__(
        self,
        executor: Executor,
        pool: Pool,
        metrics: Metrics | None = None,
        *,
        worker: int | None = None,
        intake: Intake | None = None,
        batcher: Batcher | None = None,
        admission: Admission | None = None,
    ) -> None:
        self._executor = executor
        self._pool = pool
        self._batcher = batcher
        self._metrics = metrics if metrics is not None else Metrics()
        self._catalog = describe_all(LOSSES.values())
        self._worker = () if worker is None else ((WORKER_METADATA_KEY, str(worker)),)
        self._intake = intake if intake is not None else Intake(SchedulingPolicy())
        self._admission = admission
        self._draining = asyncio.Event()  # set by drain(): streams read no more requests
        codec.allow_read_only_buffers()  # now, before any compute thread records warnings

    async def Compute(self, data: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        """One serialized ComputeRequest in, one serialized ComputeResponse out. Each request is
        recorded (metrics, the ``x-request-id`` echo as trailing metadata, one log line per
        failure) before its answer or status goes out, so a scrape after a reply always counts it."""
        received = self._intake.receive(data)
        parsed = isinstance(received.message, Message)
        record = RequestRecord(
            self._metrics, loss_label(received.message, received.unknown is not None), caller_request_id(context),
            received.size if parsed else None,
        )
        context.set_trailing_metadata(((REQUEST_ID_KEY, record.request_id), *self._worker))
        try:
            ticket = self._admit(received.size, context)
            if ticket is not None:  # the answer counts until gRPC has sent it (or the call ended)
                context.add_done_callback(lambda _: ticket.release())  # type: ignore[arg-type]  # stubs: a class
            response = await self._compute(received, record, context, ticket)
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            passed = remaining is not None and remaining <= _DEADLINE_SLACK_S
            record.finish("DEADLINE_EXCEEDED" if passed else "CANCELLED")
            raise
        except Exception as exc:
            code, details = status_of(exc, "Compute")
            record.finish(code.name, details=details)
        else:
            record.finish("OK", len(response))
            return response
        # Aborted outside the except block and without the request: gRPC keeps the abort's
        # traceback, this frame included, in a reference cycle until the garbage collector runs,
        # and a refused request's bytes must not wait for it.
        del data, received
        final(context, code)
        await context.abort(code, details)
        raise AssertionError("context.abort returned")  # pragma: no cover

    stream_window = 64  # unanswered requests per ComputeStream; no more are read until one is answered

    async def ComputeStream(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        """Each serialized ComputeStreamRequest through ``_compute``, ``stream_window`` at a time,
        answered (a serialized ComputeStreamResponse) as each finishes.

        An item's failure is its answer's ``error``; only an item whose id cannot be read, or a
        failure of the stream itself, ends the stream. Each item is recorded as one request, with
        the request id ``<the stream's x-request-id>/<item id>``.

        Once ``drain()`` is called, the stream reads no more requests, sends the answers of those
        it has read, and ends with UNAVAILABLE and the trailing metadata ``remoteloss-drained:
        <answers sent>``: a request without an answer was not taken (unless the client had
        half-closed and every request was read: then the stream ends OK as usual).
        """
        stream_id = caller_request_id(context)
        add_trailing_metadata(context, ((REQUEST_ID_KEY, stream_id), *self._worker))

        unsent: set[Ticket] = set()  # the budgets of answers computed and not yet written
        unfinished: set[RequestRecord] = set()  # items read whose tasks have not ended (or begun)

        def respond(data: bytes) -> Awaitable[tuple[bytes, Ticket | None]]:
            arrived = self._arrival(data, context, stream_id, unsent)
            unfinished.add(arrived[1])
            return self._stream_item(*arrived, context, unfinished)

        answered = 0
        try:
            answers = bounded_map(requests, respond, self.stream_window, stop=self._draining)
            async for answer, ticket in answers:
                yield answer  # resumes once gRPC has taken the answer
                answered += 1
                if ticket is not None:
                    ticket.release()
                    unsent.discard(ticket)
                del answer, ticket  # not held while the next is awaited: an idle stream pins nothing
        except Stopped:
            logger.info("event=stream_drained request_id=%s answered=%d", stream_id, answered)
            add_trailing_metadata(context, ((DRAINED_METADATA_KEY, str(answered)),))
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"the server is draining: it answered every request it took on this stream ({answered}); "
                "the requests without an answer were not taken: send them again on a new stream",
            )
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            code, details = status_of(exc, "ComputeStream")
            final(context, code)
            await context.abort(code, details)
        finally:
            for ticket in unsent:
                ticket.release()
            for record in unfinished:  # cancelled with the stream before their tasks began
                record.finish("CANCELLED")

    def drain(self) -> None:
        """Begin the drain: every ComputeStream, open or new, stops reading requests, answers
        those it has read, and ends (see ComputeStream). Call it on the server's event loop."""
        self._draining.set()

    def _arrival(
        self, data: bytes, context: grpc.aio.ServicerContext[Any, Any], stream_id: str, unsent: set[Ticket]
    ) -> tuple[int, RequestRecord, Received | Callable[[], ServiceError], Ticket | None]:
        """A stream item as the stream reads it: its id, its record, its request (or what makes
        the error that refuses it) and its place in the budgets (added to ``unsent`` until the
        stream has written its answer). Items read together (the native front hands over those
        that came at once) are so admitted before any of them computes, as calls that came at
        once are: the batcher sees them in flight and may batch them. Raises only for an
        undecodable item without an id."""
        item_id, label, parsed, request = self._item(data)
        record = RequestRecord(self._metrics, label, f"{stream_id}/{item_id}", len(data) if parsed else None)
        ticket = None
        try:
            ticket = self._admit(len(data), context)
        except ServiceError as exc:  # kept as its type and words: the exception's traceback holds data
            return item_id, record, functools.partial(type(exc), str(exc)), None
        if ticket is not None:
            unsent.add(ticket)
        return item_id, record, request, ticket

    async def _stream_item(
        self, item_id: int, record: RequestRecord, request: Received | Callable[[], ServiceError],
        ticket: Ticket | None, context: grpc.aio.ServicerContext[Any, Any], unfinished: set[RequestRecord],
    ) -> tuple[bytes, Ticket | None]:
        """One admitted item's answer (``_arrival``), an error included, and its ticket; its
        record leaves ``unfinished`` once recorded."""
        try:
            if not isinstance(request, Received):
                raise request()  # made here: an error kept in a local would hold this frame, and data, in a cycle
            response = await self._compute(request, record, context, ticket)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            record.finish("CANCELLED")
            if ticket is not None:
                ticket.release()
            raise
        except Exception as exc:
            code, message = status_of(exc, "ComputeStream")
            record.finish(code.name, details=message)
            return framing.stream_error(item_id, code.value[0], message), ticket
        else:
            record.finish("OK", len(response))
            return framing.stream_answer(item_id, response), ticket
        finally:
            unfinished.discard(record)

    def _item(self, data: bytes) -> tuple[int, str, bool, Received | Callable[[], ServiceError]]:
        """A stream item's id, its loss label, whether it parsed, and its request (a template's,
        when it matches one) or what makes the error that refuses it; raises the error of an
        undecodable item without an id, which ends the stream."""
        matched, received = self._intake.receive_item(data)
        if matched is not None:  # its request matched a template
            return matched, loss_label(received.message), True, received
        item = received.message
        assert isinstance(item, pb.ComputeStreamRequest | UndecodableRequest)
        if isinstance(item, UndecodableRequest):
            if item.id is None:
                raise item.error()
            return item.id, loss_label(item), False, item.error
        unknown = received.unknown
        label = loss_label(item.request, unknown is not None)
        if unknown is not None and not unknown.path:
            return item.id, label, True, functools.partial(
                UnimplementedError,
                f"the stream request holds field {unknown.number}, which this server does not know; "
                "it may come from a newer client",
            )
        return item.id, label, True, Received(
            item.request, received.size, received.payloads, unknown and unknown.below("request"),
            data=received.data, layout=received.layout,
        )

    def _admit(self, size: int, context: grpc.aio.ServicerContext[Any, Any]) -> Ticket | None:
        """A place in the in-flight budgets (the server's, the caller's tenant's and connection's)
        for a request of ``size`` bytes; ResourceExhaustedError when one is spent. The caller
        releases it once the answer has left."""
        if self._admission is None:
            return None
        return self._admission.admit(size, tenant=TENANT.get(), connection=context.peer())

    async def _compute(
        self,
        received: Received,
        record: RequestRecord,
        context: grpc.aio.ServicerContext[Any, Any],
        ticket: Ticket | None,
    ) -> bytes:
        """One admitted request, from checks to serialized answer: the path of Compute and of
        every ComputeStream item. Its answer counts in ``ticket``'s budgets from before it is
        computed (``framing.held_bytes``) until it has been sent.

        Raises the domain errors of ``errors``; never aborts the call, which a stream's items share.
        """
        intake = self._intake
        prepared = intake.prepare_now(received) if received.size <= intake.inline_bytes else await intake.prepare(received)
        record.elements = prepared.elements
        if ticket is not None:  # its answer counts from now; one that could never fit is refused
            ticket.reserve(*framing.held_bytes(prepared.call), prepared.loss)
        if self._batcher is None:
            job = (prepared.call, prepared.grad_output)
            result = await asyncio.get_running_loop().run_in_executor(self._pool, self._executor.run, *job)
        else:
            remaining = context.time_remaining()
            deadline = None if remaining is None else self._batcher.clock() + remaining
            result = await self._batcher.submit(prepared.call, prepared.grad_output, deadline, tenant=record.tenant)
        inline = framing.tensor_bytes(result) <= intake.inline_bytes
        answer = framing.answer(result) if inline else await asyncio.to_thread(framing.answer, result)
        if ticket is not None:
            ticket.answered(framing.HELD_COPIES * len(answer))
        return answer

    @translate_errors
    async def ListLosses(
        self,
        request: pb.ListLossesRequest,
        context: grpc.aio.ServicerContext[pb.ListLossesRequest, pb.ListLossesResponse],
    ) -> pb.ListLossesResponse:
        return self._catalog
