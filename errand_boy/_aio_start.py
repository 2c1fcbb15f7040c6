"""The asyncio client: how a :class:`~errand_boy.aio.Process` starts, and
status requests (see :mod:`errand_boy.aio`).

The plan (descriptors or frames, the request, the fallback to frames for a
revision-1 server) is the client core's :class:`~errand_boy.client._core.Launch`;
this module does the asyncio half.
"""

from __future__ import annotations

import asyncio
from subprocess import PIPE
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

from . import client, protocol
from ._aio_process import Process
from ._aio_streams import StdinWriter, _check_server
from .client import _fds
from .client._core import CommandCore, Launch
from .defaults import resolve_socket_path
from .exceptions import ErrandBoyError, ServerUnavailable


async def _create(
    args: Any,
    target: Dict[str, Any],
    *,
    stdin: Any,
    stdout: Any,
    stderr: Any,
    cwd: Any,
    env: Optional[Mapping[Any, Any]],
    timeout: Optional[float],
    limit: int,
    socket_path: Optional[str],
    trusted_uids: Optional[Iterable[int]] = None,
    early_input: Optional[bytes] = None,
    pass_fds: Sequence[int] = (),
    server_env: bool = False,
    frames: bool = False,
) -> Process:
    launch = Launch(
        resolve_socket_path(socket_path), target, cwd=cwd, env=env, timeout=timeout,
        server_env=server_env, frames=frames, pass_fds=pass_fds,
    )  # fmt: skip
    plan = launch.descriptor_plan(stdin, stdout, stderr)
    if plan is not None:
        try:
            outputs = (stdout, stderr)
            return await _create_with_fds(args, launch, plan, outputs, limit, trusted_uids, early_input)
        except ErrandBoyError as exc:
            if not launch.may_fall_back(exc):
                raise
            if not launch.fall_back(await _status_or_none(launch, trusted_uids)):
                raise
    request, source, sinks = launch.frames_request(stdin, stdout, stderr)
    process = Process(args, launch.socket_path, sinks, limit, trusted_uids)
    if early_input is not None:
        # The caller's whole input (run, run_cmd): no stdin stream. Small
        # input goes in the same send as the request.
        frames_sent, source = process._core.early_input(early_input)
        request += frames_sent
    elif stdin is PIPE:
        process.stdin = StdinWriter(process)
    await process._start(request, source)
    return process


async def _create_with_fds(
    args: Any, launch: Launch, plan: _fds.StreamPlan, outputs: Tuple[Any, Any], limit: int,
    trusted_uids: Optional[Iterable[int]], early_input: Optional[bytes],
) -> Process:  # fmt: skip
    """Revision 2: the streams are descriptors sent with the request."""
    try:
        request, sinks = launch.descriptor_request(plan, *outputs)
        process = Process(args, launch.socket_path, sinks, limit, trusted_uids)
        try:
            await process._start(request, None, plan.send)
        finally:
            plan.close_theirs()
        await process._connect_pipes(plan, limit)
    except BaseException:
        plan.close_all()
        raise
    process._early_input = early_input
    return process


async def _status_or_none(launch: Launch, trusted_uids: Optional[Iterable[int]]) -> Optional[Dict[str, Any]]:
    """The server's status, or None when it cannot be had (for Launch.fall_back)."""
    try:
        return await status(launch.socket_path, trusted_uids=trusted_uids)
    except (ErrandBoyError, OSError):
        return None


async def status(
    socket_path: Optional[str] = None, *, trusted_uids: Optional[Iterable[int]] = None
) -> Dict[str, Any]:
    """The server's figures (its ``S`` object), from a server we trust."""
    path = resolve_socket_path(socket_path)
    trusted_uids = client.trusted_uids_from(trusted_uids)
    try:
        reader, writer = await asyncio.open_unix_connection(path)
    except OSError as exc:
        raise ServerUnavailable(path, exc) from exc
    _check_server(writer, path, trusted_uids)
    core = CommandCore(path, op="status")
    try:
        writer.write(protocol.encode_status_request())
        while not core.finished:
            try:
                data = await reader.read(client.RECV_SIZE)
            except ConnectionResetError as exc:
                core.connection_lost(exc)
            else:
                core.receive_data(data)
    finally:
        writer.transport.abort()
    return core.status_result()
