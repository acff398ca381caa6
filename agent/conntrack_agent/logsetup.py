"""structlog configuration: the only module that imports structlog.

One event per decision and per notable condition. `emit` adds the sentence
(MESSAGE), the priority and the MESSAGE_ID from events.EVENTS, so every sink
shows the same thing: a terminal gets one readable line, a pipe gets JSON lines,
and under systemd the journald sink (journald.py) sends the fields natively.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
import time
import types
from typing import Any, Dict, Optional, TextIO


class _Deferred(types.ModuleType):
    """Stands in sys.modules for a module until something reads one of its
    attributes: it then takes itself out, imports the real module and hands over
    (a later `import` gets the real one)."""

    package = False   # `from X import Y` asks a module for __path__: only a package's is worth loading

    def __getattr__(self, name: str) -> Any:
        if name == "__path__" and not self.package:
            raise AttributeError(name)
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return getattr(importlib.import_module(self.__name__), name)


class _DeferredAsyncio(_Deferred):
    package = True

    def current_task(self, loop: Any = None) -> Any:
        """What logging.LogRecord asks of any asyncio in sys.modules (Python 3.12+):
        with asyncio never loaded no event loop can run, and asyncio's own answer
        would be this RuntimeError."""
        real = sys.modules.get("asyncio")
        if real is not None and real is not self:
            return real.current_task(loop)
        raise RuntimeError("no running event loop")


class _DeferredPickle(_Deferred):
    # pickle's own: it takes these from its C accelerator, which costs nothing more.
    from _pickle import PicklingError


def _defer_imports() -> None:
    """structlog imports modules at import time that the agent's use of it never
    reaches (RSS measured with bench/rss_installed.py and fresh interpreters):
    - asyncio, for its async log methods (ainfo(), ...): +1.6 MB (PyGObject 3.50,
      Debian 13's, asks for it too: dbus_service answers it for the gi import);
    - shutil, for its ConsoleRenderer's terminal width (structlog 25, Debian 13),
      with bz2 and lzma: +0.5 MB;
    - uuid, for the names of its deprecated thread-local classes: +0.3 MB with the
      platform module it brings on Debian 12, +0.1 MB on Debian 13;
    - pickle, for the PicklingError its loggers raise: +0.1 MB on Debian 12, +0.25 MB
      on Debian 13 (the stand-in hands out the very same class, from _pickle).
    Unless something imported them already, each gets a stand-in that imports it on
    first use: structlog's `import` binds the stand-in, and a caller that does use
    the module gets all of it. (importlib.util.LazyLoader cannot do this: `import`
    itself reads a lazy module's __spec__, which loads it.)"""
    for name, kind in (("asyncio", _DeferredAsyncio), ("shutil", _Deferred), ("uuid", _Deferred),
                       ("pickle", _DeferredPickle)):
        if name not in sys.modules:
            sys.modules[name] = kind(name)


_defer_imports()

import structlog  # noqa: E402  (after _defer_imports)

from . import events  # noqa: E402
from .journald import format_exc_info  # noqa: E402

# syslog priority -> stdlib level that structlog filters on
_LEVEL = {events.ERR: logging.ERROR, events.WARNING: logging.WARNING,
          events.NOTICE: logging.INFO, events.INFO: logging.INFO}
_PRIORITY_NAME = {3: "err", 4: "warning", 5: "notice", 6: "info", 7: "debug"}

# Fields shown on a terminal line after the sentence, in this order.
_CONSOLE_FIELDS = ("rule", "netns", "count", "max", "usage", "fill_rate", "time_to_full", "drop", "early_drop")


def _console_renderer(stream: TextIO):
    colour = stream.isatty()
    tint = {3: "\033[31m", 4: "\033[33m", 5: "\033[36m"}

    def render(_logger: Any, _name: str, event: Dict[str, Any]) -> str:
        priority = event.get("priority", 6)
        stamp = time.strftime("%H:%M:%S", time.localtime(event.get("ts", time.time())))
        name = _PRIORITY_NAME.get(priority, "info")
        level = f"{tint[priority]}{name:<7}\033[0m" if colour and priority in tint else f"{name:<7}"
        extras = " ".join(f"{k}={_short(event[k])}" for k in _CONSOLE_FIELDS if event.get(k) not in (None, ""))
        line = f"{stamp} {level} {event.get('message', event.get('event'))}" + (f"  [{extras}]" if extras else "")
        if event.get("exception"):
            line += "\n" + "\n".join("    " + text for text in str(event["exception"]).splitlines())
        return line
    return render


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _json_renderer(_logger: Any, _name: str, event: Dict[str, Any]) -> str:
    return json.dumps(event, default=str, separators=(",", ":"))


def _stamp(_logger: Any, _name: str, event: Dict[str, Any]) -> Dict[str, Any]:
    event.setdefault("ts", round(time.time(), 6))
    return event


def _exception(_logger: Any, _name: str, event: Dict[str, Any]) -> Dict[str, Any]:
    """exc_info (an exception object) becomes `exception`, the traceback as text,
    which every sink shows: indented under the console line, a JSON string, the
    journal's EXCEPTION field. Left as an object, JSON would show only str(exc)
    and the console nothing."""
    exc_info = event.pop("exc_info", None)
    if exc_info and not event.get("exception"):
        text = format_exc_info(exc_info)
        if text:
            event["exception"] = text
    return event


def configure(log_format: str = "auto", stream: Optional[TextIO] = None, verbose: bool = False,
              journal_socket: Optional[str] = None) -> str:
    """Set up the chain; returns the format chosen ("console", "json" or "journal").
    `journal_socket`: another path than journald's (the tests' stand-in)."""
    stream = stream or sys.stderr
    chosen = log_format
    if log_format in ("auto", "journal"):
        chosen = "console" if stream.isatty() else "json"
        try:
            from . import journald
        except ImportError:  # pragma: no cover - journald.py ships with the package
            journald = None
        if journald is not None and (log_format == "journal" or journald.running_under_journal()):
            chosen = "journal"
    if chosen == "journal":
        from . import journald
        renderer = journald.journal_processor(journald.JournalSink(journal_socket) if journal_socket else None)
    elif chosen == "console":
        renderer = _console_renderer(stream)
    else:
        renderer = _json_renderer
    structlog.configure(
        processors=[_stamp, _exception, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG if verbose else logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    return chosen


def get_logger() -> Any:
    return structlog.get_logger()


def emit(log: Any, kind: str, dry_run: bool = False, **fields: Any) -> None:
    """Log one event of a kind listed in events.EVENTS."""
    fields["dry_run"] = dry_run
    if events.has_verb(kind):
        fields.setdefault("verb", events.verb(kind, dry_run))
    priority = events.priority_of(kind, dry_run)
    fields["message"] = events.message(kind, fields)
    fields.pop("verb", None)
    fields["priority"] = priority
    if kind in events.EVENTS:
        fields["message_id"] = events.EVENTS[kind].message_id
    log.log(_LEVEL.get(priority, logging.INFO), kind, **fields)
