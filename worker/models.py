"""Where the model comes from: a local folder, or a ModelScope id downloaded to a local folder."""

from __future__ import annotations

import logging
from pathlib import Path

from producer.settings import ModelSettings

log = logging.getLogger(__name__)


def resolve_model(model: ModelSettings) -> Path:
    """The local folder holding ``model.source``, downloading it from ModelScope if needed.

    We resolve ModelScope ids ourselves and hand vLLM a folder: ``VLLM_USE_MODELSCOPE``
    patches transformers' hub functions process-wide and fails the same way offline.
    """
    local = Path(model.source).expanduser()
    if local.is_dir():
        log.info("model %r: local folder %s", model.served_name, local.resolve())
        return local.resolve()
    if model.source.startswith(("/", ".", "~")) or local.exists():
        raise FileNotFoundError(
            f"model.source={model.source!r} is not a folder. Point model.source (settings.toml, or "
            "VQUEUE_MODEL__SOURCE) at a model folder, or at a ModelScope id such as Qwen/Qwen2-VL-2B-Instruct."
        )
    from modelscope import snapshot_download  # imported late: only ModelScope sources need it

    log.info("model %r: ModelScope id %s (revision %s), downloading if not cached in %s",
             model.served_name, model.source, model.revision or "default", model.cache_dir or "ModelScope's cache")
    try:
        path = Path(snapshot_download(model.source, revision=model.revision, cache_dir=model.cache_dir))
    except Exception as exc:
        raise RuntimeError(
            f"could not fetch {model.source!r} from ModelScope ({type(exc).__name__}: {exc}). "
            "Check the id and the network, or download the model elsewhere and set model.source to its folder."
        ) from exc
    log.info("model %r: ModelScope %s resolved to %s", model.served_name, model.source, path)
    return path
