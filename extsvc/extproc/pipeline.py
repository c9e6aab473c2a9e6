"""Compiled ext_proc policies: plain objects awaited in order, no pluggy, no parsing per message."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from time import perf_counter
from typing import Any

from extsvc.config.model import ExtprocConfig, ExtprocOnError, Unselected
from extsvc.deadline import Deadline, start
from extsvc.extproc import convert
from extsvc.extproc.model import Exchange, HeaderChanges, HttpMessage, ImmediateReply, Phase
from extsvc.observability.logging import LogThrottle
from extsvc.observability.tracing import StepTrace
from extsvc.selection import by_authority

log = logging.getLogger(__name__)

Hook = Callable[[HttpMessage], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class CompiledProcessor:
    label: str
    kind: str
    processor: object
    phases: frozenset[Phase]
    duration: Any  # prometheus Histogram child {policy, processor}
    raised: Any  # Counter child {reason="exception"}
    overran: Any  # Counter child {reason="timeout"}
    #: per phase (by ``Phase.number``) what ``fixed_headers`` answered (headers phases only)
    fixed: tuple[HeaderChanges | None, ...] = (None,) * len(Phase)
    #: messages it reads without a hook (``Processor.reads``), bodies it needs whole
    reads: frozenset[Phase] = frozenset()
    whole_bodies: frozenset[Phase] = frozenset()


class FixedAnswer:
    """A phase every processor of a policy answers with fixed header changes: the changes as
    ``HttpMessage`` records them, and the ``ProcessingResponse`` carrying them, built once."""

    __slots__ = ("answer", "ops")

    def __init__(self, phase: Phase, changes: tuple[HeaderChanges, ...]) -> None:
        self.ops = tuple(op for change in changes for op in change.ops())
        message = HttpMessage(phase, Exchange(clock=float))
        message.ops.extend(self.ops)
        self.answer = convert.answer(message)


class CompiledExtprocPolicy:
    """One ext_proc policy, ready to serve: per phase, the processors' bound hooks in order."""

    def __init__(
        self,
        name: str,
        processors: tuple[CompiledProcessor, ...],
        *,
        on_error: ExtprocOnError = ExtprocOnError.FAIL,
        error_status: int = 500,
        timeout_s: float = 0.15,
        mode_override: bool = True,
    ) -> None:
        self.name = name
        self.processors = processors
        self.on_error = on_error
        self.error_status = error_status
        self.timeout_s = timeout_s
        self.mode_override = mode_override
        #: per phase (by ``Phase.number``) the processors' bound hooks, in policy order
        self.chains: tuple[tuple[tuple[CompiledProcessor, Hook], ...], ...] = tuple(
            tuple(
                (p, getattr(p.processor, f"on_{phase.field}"))
                for p in processors
                if phase in p.phases
            )
            for phase in Phase
        )
        #: the phases at least one processor needs (the rest are switched off by mode_override)
        self.phases = frozenset(phase for phase in Phase if self.chains[phase.number])
        #: ``needs[phase.number]``: the same as a tuple, for the per-message check
        self.needs = tuple(bool(chain) for chain in self.chains)
        #: the phases Envoy must keep sending: those with hooks, and those read without one
        self.wanted = self.phases.union(*(p.reads for p in processors))
        #: body phases a processor needs whole (mode_override asks Envoy to buffer them)
        self.whole_bodies = frozenset[Phase]().union(*(p.whole_bodies for p in processors))
        #: per phase: the prebuilt answer when every processor's changes are fixed (headers
        #: phases only; see Processor.fixed_headers), else None
        self.fixed: tuple[FixedAnswer | None, ...] = tuple(
            FixedAnswer(phase, tuple(c for p, _ in chain if (c := p.fixed[phase.number]) is not None))
            if phase.is_headers and chain and all(p.fixed[phase.number] is not None for p, _ in chain)
            else None
            for phase, chain in zip(Phase, self.chains, strict=True)
        )
        #: per phase: header-only answers by the changes' records (``HttpMessage.ops``), for
        #: hooks that keep making the same changes; None once a phase's answers keep differing
        self.answers: list[dict[tuple[tuple[Any, ...], ...], Any] | None] = [
            {} if phase.is_headers else None for phase in Phase
        ]
        #: mode_override answers built from shared answers (fixed or CONTINUE), by
        #: (answer id, request body mode, response body mode, skip response headers)
        self.override_memo: dict[tuple[int, Any, Any, bool], Any] = {}
        #: processor failures are logged once per processor, cause and interval (the metrics
        #: count all): a dependency that hangs fails every stream at once
        self._throttle = LogThrottle()

    async def run(self, message: HttpMessage, trace: list[StepTrace] | None = None) -> str:
        """Run the phase's processors on ``message`` under ``timeout_s``; the processor that
        answered the client itself (``message.reply``), or "".

        A processor that raises or overruns is answered per ``on_error``: ``fail`` replaces the
        answer with an immediate ``error_status`` reply; ``continue`` drops that processor's
        changes (and, after a timeout, skips the rest). ``trace``, when given (the stream is
        traced), gets one :data:`StepTrace` per processor run.
        """
        chain = self.chains[message.phase.number]
        if not chain:
            return ""
        # One timer for the chain, made and armed only if a hook suspends (extsvc.deadline),
        # for what is left of timeout_s then.
        guard: Deadline | None = None
        current: CompiledProcessor | None = None
        mark = 0
        begun = started = perf_counter()
        try:
            for current, hook in chain:
                mark = len(message.ops)
                failed = ""
                try:
                    # extsvc.deadline.start: no coroutine of ours per processor and message
                    _, rest = start(hook(message))
                    if rest is not None:  # it suspended: now the deadline matters
                        guard = guard or self._guard(begun)
                        guard.arm()
                        await rest
                except asyncio.CancelledError:
                    failed = "timeout"
                    raise
                except Exception as exc:  # noqa: BLE001 (isolating a processor's failure is the point)
                    failed = "error"
                    current.raised.inc()
                    self._failed(message, current, f"raised {exc!r}", mark, type(exc).__name__)
                    if message.reply is not None:
                        return current.label
                    continue
                finally:
                    ended = perf_counter()
                    current.duration.observe(ended - started)
                    if trace is not None:
                        trace.append((
                            current.label, current.kind,
                            failed or ("immediate" if message.reply is not None else "ok"),
                            started, ended,
                        ))
                    started = ended
                if message.reply is not None:  # an immediate response ends the chain
                    return current.label
        except asyncio.CancelledError:
            if guard is None or not guard.consume():
                raise
            assert current is not None
            current.overran.inc()
            self._failed(message, current, f"overran {self.timeout_s * 1000:.0f} ms", mark, "timeout")
            if message.reply is not None:
                return current.label
        finally:
            if guard is not None:
                guard.disarm()
        return ""

    def _guard(self, begun: float) -> Deadline:
        """The chain's deadline: timeout_s from ``begun`` (a perf_counter reading)."""
        left = self.timeout_s - (perf_counter() - begun)
        return Deadline(asyncio.get_running_loop().time() + left)

    def _failed(
        self, message: HttpMessage, processor: CompiledProcessor, why: str, mark: int, cause: str
    ) -> None:
        exchange = message.exchange
        held = self._throttle.allow(f"{processor.label}:{cause}:{message.phase.value}")
        if held is not None:
            log.warning(
                "ext_proc policy %s: processor %s (%s) %s in %s; on_error=%s%s [request_id=%s]",
                self.name, processor.label, processor.kind, why, message.phase.value,
                self.on_error.value, f" ({held} more since the last report)" if held else "",
                exchange.request_id if exchange.has_request_headers else "",
            )
        message.rollback(mark)
        if self.on_error is ExtprocOnError.FAIL:
            message.reply = ImmediateReply(
                self.error_status, b"", {}, f"extsvc_processor_failed:{processor.label}", None
            )


class ExtprocPolicies:
    """The ``extproc:`` part of a runtime: compiled policies and the selection rule."""

    def __init__(
        self,
        config: ExtprocConfig,
        policies: Mapping[str, CompiledExtprocPolicy],
        processors: tuple[object, ...] = (),
    ) -> None:
        self.config = config
        self.policies = dict(policies)
        self.processors = processors
        #: the policy of streams that choose none (``extproc.unselected``): no processors, so
        #: every message passes unchanged; None = reject them
        self.unselected: CompiledExtprocPolicy | None = (
            CompiledExtprocPolicy("", ()) if config.unselected is Unselected.PASS_THROUGH else None
        )
        default = config.default_policy
        #: whether the call's authority can change the answer of select(); when not, reading it
        #: (the call's metadata, per stream) is skipped
        self.authority_matters = (
            bool(config.policy_attribute)
            or config.policy_metadata is not None
            or bool(config.policy_header)
            or any(name != default for name in self.policies)
            or any(name != default for name in config.authority_policies.values())
        )

    def select(
        self, authority: Callable[[], str], exchange: Exchange
    ) -> tuple[str, CompiledExtprocPolicy | None]:
        """Pick the stream's policy: ``:authority``, attribute, metadata, header, default.

        Called once per stream, after the first message has filled ``exchange``.
        """
        config = self.config
        name: str | None = None
        host = authority() if self.authority_matters else ""
        if host:
            name = by_authority(host, config.authority_policies, self.policies)
        if name is None and config.policy_attribute:
            value = exchange.attributes.get(config.policy_attribute)
            name = str(value) if value else None
        if name is None and config.policy_metadata is not None:
            fields = exchange.metadata.get(config.policy_metadata.namespace)
            value = fields.get(config.policy_metadata.key) if isinstance(fields, Mapping) else None
            name = str(value) if value else None
        if name is None and config.policy_header and config.policy_header_trusted:
            # only ever a header Envoy set (the config says it strips the client's)
            name = exchange.request_headers.get(config.policy_header) or None
        if name is None:
            name = config.default_policy or ""
        if not name:
            return "", self.unselected
        return name, self.policies.get(name)
