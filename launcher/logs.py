"""Where each worker's output goes: torchrun's log layout and console rules.

Layout, one directory per run and one per attempt::

    <log_dir>/<run_id>_<random>/attempt_<n>/<global rank>/stdout.log
                                                         /stderr.log
                                                         /error.json
    <log_dir>/<run_id>_<random>/attempt_<n>/filtered_stdout.log
    <log_dir>/<run_id>_<random>/attempt_<n>/filtered_stderr.log

Console rules (torchrun's): a stream that is neither redirected nor teed goes
to the console unprefixed; a redirected stream goes only to its file; a teed
stream goes to its file and to the console, each line prefixed with
``[<role><local rank>]:`` or with ``TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE``.
``local_ranks_filter`` hides the other ranks from the console (files are
still written). Duplicate filters copy matching teed lines to the attempt's
``filtered_std*.log``.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from enum import IntFlag
from string import Template


class Std(IntFlag):
    NONE = 0
    OUT = 1
    ERR = 2
    ALL = OUT | ERR

    @classmethod
    def from_str(cls, value: str) -> "Std | dict[int, Std]":
        """Parse torchrun's syntax: ``3`` for every rank, or ``0:1,1:2`` per local rank."""
        value = value.strip()
        if re.fullmatch(r"[0-3]", value):
            return cls(int(value))
        if re.fullmatch(r"(\d+:[0-3])(,\d+:[0-3])*", value):
            return {int(rank): cls(int(std)) for rank, std in (item.split(":") for item in value.split(","))}
        raise ValueError(f"'{value}' is not 0-3 or a list of <local rank>:<0-3> such as 0:1,1:2")


def to_map(value: "Std | dict[int, Std]", local_world_size: int) -> dict[int, Std]:
    """One ``Std`` per local rank; ranks missing from a mapping get ``Std.NONE``."""
    if isinstance(value, Std):
        return dict.fromkeys(range(local_world_size), value)
    return {rank: value.get(rank, Std.NONE) for rank in range(local_world_size)}


@dataclass
class StreamLogs:
    """Where one stream (stdout or stderr) of one worker goes."""

    file: str | None  # redirected or teed: every line is written here
    console: bool  # every line is echoed to the launcher's own stream
    prefix: str  # put before each console line: "" unless the stream is teed
    teed: bool  # teed: lines matching a duplicate filter also go to the attempt's filtered file


@dataclass
class WorkerLogs:
    stdout: StreamLogs
    stderr: StreamLogs
    error_file: str  # TORCHELASTIC_ERROR_FILE for this worker


@dataclass
class AttemptLogs:
    """The log destinations of one attempt of the local worker group."""

    directory: str
    workers: dict[int, WorkerLogs]  # by local rank
    filtered_stdout: str
    filtered_stderr: str


@dataclass
class LogsSpecs:
    """torchrun's DefaultLogsSpecs: the log directory and the per-rank stream settings."""

    log_dir: str | None = None
    redirects: "Std | dict[int, Std]" = Std.NONE
    tee: "Std | dict[int, Std]" = Std.NONE
    local_ranks_filter: set[int] | None = None
    _run_dir: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.log_dir and os.path.isfile(self.log_dir):
            raise NotADirectoryError(f"log_dir: {self.log_dir} is a file")

    @property
    def root_log_dir(self) -> str:
        if not self.log_dir:
            self.log_dir = tempfile.mkdtemp(prefix="torchelastic_")
        return self.log_dir

    def run_dir(self, run_id: str) -> str:
        """``<log_dir>/<run_id>_<random>``, made once per launcher run."""
        if self._run_dir is None:
            try:
                os.makedirs(self.root_log_dir, exist_ok=True)
                self._run_dir = tempfile.mkdtemp(prefix=f"{run_id}_", dir=self.root_log_dir)
            except OSError as error:
                raise OSError(error.errno, f"cannot make the log directory: {error.strerror}", error.filename) \
                    from None
        return self._run_dir

    def attempt(
        self,
        run_id: str,
        restart_count: int,
        role: str,
        global_ranks: dict[int, int],
        prefix_template: str | None = None,
    ) -> AttemptLogs:
        """Create ``attempt_<restart_count>`` and decide each local worker's destinations.

        ``global_ranks`` maps each local rank to its global rank.
        """
        directory = os.path.join(self.run_dir(run_id), f"attempt_{restart_count}")
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory)
        redirects = to_map(self.redirects, len(global_ranks))
        tees = to_map(self.tee, len(global_ranks))
        workers = {}
        for local_rank, global_rank in global_ranks.items():
            rank_dir = os.path.join(directory, str(global_rank))
            os.makedirs(rank_dir)
            shown = not self.local_ranks_filter or local_rank in self.local_ranks_filter
            if prefix_template:
                prefix = Template(prefix_template).safe_substitute(
                    role_name=role, rank=global_rank, local_rank=local_rank
                )
            else:
                prefix = f"[{role}{local_rank}]:"

            streams = {}
            for std, name in ((Std.OUT, "stdout.log"), (Std.ERR, "stderr.log")):
                teed = bool(tees[local_rank] & std)
                to_file = teed or bool(redirects[local_rank] & std)
                streams[std] = StreamLogs(
                    file=os.path.join(rank_dir, name) if to_file else None,
                    console=shown and (teed or not to_file),
                    prefix=prefix if teed else "",
                    teed=teed,
                )
            workers[local_rank] = WorkerLogs(
                stdout=streams[Std.OUT],
                stderr=streams[Std.ERR],
                error_file=os.path.join(rank_dir, "error.json"),
            )
        return AttemptLogs(
            directory=directory,
            workers=workers,
            filtered_stdout=os.path.join(directory, "filtered_stdout.log"),
            filtered_stderr=os.path.join(directory, "filtered_stderr.log"),
        )
