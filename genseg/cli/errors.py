"""What the command line says when an expected failure happens: what failed and what to
do, in one or two lines on stderr, exit status non-zero, no traceback.

Commands raise :class:`Failure` for what they detect themselves; :func:`explain`
translates the library exceptions that mean an expected failure (no broker, models that
cannot be loaded...). Anything else is a bug and keeps its traceback. ``genseg --debug``
(or ``GENSEG_DEBUG=1``) shows the traceback of expected failures too.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click
import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

if TYPE_CHECKING:
    from genseg.workers import StageStartError
    from plumbing.settings import Settings

#: What to do when no broker answers; said by every command that needs one.
START_A_BROKER = "start one with `genseg broker`, or set KAFKA_BOOTSTRAP_SERVERS"
#: What to do when a broker is there but does not answer.
CHECK_THE_BROKER = "check that it is up, and KAFKA_BOOTSTRAP_SERVERS (and the security settings)"


@dataclass(eq=False)
class Failure(Exception):
    """An expected failure, said in words."""

    what: str
    todo: str | None = None
    exit_code: int = 1

    def __str__(self) -> str:
        return self.what if self.todo is None else f"{self.what}: {self.todo}"


def explain(exc: BaseException) -> Failure | None:
    """The expected failure ``exc`` means, or None (a bug: keep its traceback).

    The modules of the exceptions are imported here, when something failed, so that
    ``genseg submit`` pays nothing for this table.
    """
    from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError

    from genseg.demo import DemoFailed
    from genseg.workers import InvalidWorkerOptions, StageStartError
    from plumbing.broker import BrokerError

    if isinstance(exc, Failure):
        return exc
    if isinstance(exc, KafkaConnectionError):  # the broker went away after the first check
        detail = _line(exc).removeprefix("KafkaConnectionError: ")
        return Failure(f"cannot reach the Kafka broker ({detail})", START_A_BROKER)
    if isinstance(exc, KafkaTimeoutError):
        return Failure("the Kafka broker did not answer in time", CHECK_THE_BROKER)
    if isinstance(exc, StageStartError):
        return _stage_start(exc)
    if isinstance(exc, InvalidWorkerOptions):
        return Failure(str(exc), "see `genseg worker --help`", exit_code=2)
    if isinstance(exc, BrokerError):
        # Its first line says why, and where the broker's log is or what to do.
        return Failure(f"the embedded broker did not start: {_line(exc, limit=300)}")
    if isinstance(exc, DemoFailed):
        return Failure(f"demo failed: {exc}")
    return None


def _stage_start(exc: StageStartError) -> Failure | None:
    """A stage whose models could not be loaded: which setting names them, and what to
    set it to."""
    cause = exc.__cause__
    if not isinstance(cause, OSError | ValueError | ImportError):
        return None  # not a loading problem we know of: show the traceback
    offline = _cannot_download(cause)
    reason = "not on this machine, and downloading it failed" if offline else _line(cause)
    setting = _model_setting(exc.stage, exc.settings)
    if setting is None:
        return Failure(f"the {exc.stage} stage did not start: {reason}")
    name, value, what = setting
    todo = f"set {name} to {what}" + (" (this machine cannot download)" if offline else "")
    return Failure(f"could not load {name} {value}: {reason}", todo)


def _model_setting(stage: str, settings: Settings) -> tuple[str, str, str] | None:
    """(variable, its value, what it should name) of the models ``stage`` loads."""
    profile = settings.models
    if stage == "gen" and profile == "pretrained":
        return "SD_MODEL", settings.sd_model, "a local diffusers directory or .safetensors file"
    if stage == "gen" and profile == "toy":
        return (
            "TOY_SD_MODEL",
            settings.toy_sd_model or "(the shipped toy/weights/sd)",
            "a diffusers directory made by `genseg train-toy`",
        )
    if stage == "seg" and settings.segmenter != "sam":
        if profile != "pretrained":
            return None  # a profile the backend does not serve: its one-line reason says so
        name = "SAM2_MODEL" if settings.segmenter == "sam2" else "SAM3_MODEL"
        value = settings.sam2_model if settings.segmenter == "sam2" else settings.sam3_model
        return name, value, f"a local transformers directory of a {settings.segmenter} model"
    if stage == "seg" and profile in ("pretrained", "toy"):
        return (
            "SAM_CHECKPOINT",
            settings.sam_checkpoint or "(not set)",
            f"a local segment-anything checkpoint file for SAM_MODEL={settings.sam_model}",
        )
    return None


#: Exceptions of HTTP clients (httpx, httpcore) named, not imported: the CLI stays light.
_NETWORK_ERRORS = {"ConnectError", "ConnectTimeout", "NetworkError", "OfflineModeIsEnabled"}


def _cannot_download(exc: BaseException) -> bool:
    """Whether ``exc`` or what caused it is a failed connection (no internet, offline mode)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ConnectionError | socket.gaierror):
            return True
        if type(current).__name__ in _NETWORK_ERRORS:
            return True
        current = current.__cause__ or current.__context__
    return False


def _line(exc: BaseException, limit: int = 160) -> str:
    """The first line of ``exc``'s message, cut at ``limit`` characters."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def report(failure: Failure, console: Console) -> None:
    """Print ``failure``: what (red), then what to do; never wrapped into more lines."""
    console.print(Text(failure.what, style="red"), soft_wrap=True)
    if failure.todo:
        console.print(Text(failure.todo), soft_wrap=True)


class ExplainingGroup(TyperGroup):
    """The command group whose commands' expected failures are reported, not raised."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise  # said by the command already, or by click
        except Exception as exc:
            failure = explain(exc)
            if failure is None or ctx.params.get("debug"):
                raise
            report(failure, Console(stderr=True))
            raise typer.Exit(failure.exit_code) from None
