"""The messages between a server and its engine process: pickled, tensors as numpy arrays.

Pickling a torch tensor goes through its storage, which costs several times more than pickling
the same values as a numpy array, so tensors cross as arrays and come back as tensors.

Server → engine process: ``("start", model, LoadOptions, EngineConfig, log level)``,
``("add", [Request, ...])`` (those submitted in one event-loop iteration), ``("abort", request_id)``,
``("stop",)``.
Engine process → server: ``("loaded", LoadedModel without model and tokenizer, description)`` or
``("failed", exception)``, then
``("ready", EngineStats)``, then ``("outputs", [(request_id, Output), ...], EngineStats | None)``
once per engine step that had outputs.
"""

from __future__ import annotations

import io
import pickle
import threading
from multiprocessing.connection import Connection
from typing import Any

import torch


class TensorPickler(pickle.Pickler):
    """Pickles torch tensors as numpy arrays (bfloat16 ones as float32: numpy has no bfloat16)."""

    def reducer_override(self, obj):
        if not isinstance(obj, torch.Tensor):
            return NotImplemented
        tensor = obj.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        return torch.from_numpy, (tensor.numpy(),)


def dumps(message: Any) -> bytes:
    buffer = io.BytesIO()
    TensorPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(message)
    return buffer.getvalue()


def loads(data: bytes) -> Any:
    return pickle.loads(data)


class Channel:
    """One end of the socket between a server and its engine process; `send` is thread-safe."""

    def __init__(self, connection: Connection):
        self.connection = connection
        self._send_lock = threading.Lock()

    def send(self, *message: Any) -> None:
        data = dumps(message)
        with self._send_lock:
            self.connection.send_bytes(data)

    def receive(self) -> tuple:
        """The next message; EOFError when the other end has closed."""
        return loads(self.connection.recv_bytes())

    def close(self) -> None:
        self.connection.close()
