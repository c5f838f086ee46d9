"""Save, load and push CGC models the huggingface_hub way, and export the plain backbone.

A saved model is a folder (or a Hub repository) with ``config.json`` (the :class:`CGCConfig`
plus a format version), ``model.safetensors`` (the full state dict) and a ``README.md`` card.
Loading rebuilds the architecture from the config with random weights, never downloading
backbone weights, then loads the saved state strictly.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import safetensors
import safetensors.torch
import torch
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from ._io import replace_folder
from .backbones import BackboneAdapter, HubOptions
from .card import model_card
from .config import CGCConfig
from .errors import CGCValueError, CheckpointError
from .model_files import (
    CARD_NAME,
    CONFIG_NAME,
    FORMAT_VERSION,  # noqa: F401 - read as hub.FORMAT_VERSION
    PICKLE_WEIGHTS_NAME,
    RESERVED_NAMES,
    WEIGHTS_NAME,
    config_file_dict,
    is_cgc_folder,
    is_export_folder,
    load_state,
    read_config,
    read_weights,
    state_dict_diff,
)

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo
    from torch import nn

logger = logging.getLogger(__name__)

M = TypeVar("M", bound="CGCHubMixin")


class CGCHubMixin:
    """``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` / ``export_backbone``.

    Follows huggingface_hub conventions (safetensors weights, ``config.json``, a model card,
    Hub ids or local folders, the Hub cache) with stricter loading than
    ``PyTorchModelHubMixin``: every key must match, pickle is refused unless asked for, and
    remote code is never run. Mixed into :class:`~cgc_hf.CGCModel`.

    Example:
        >>> model.save_pretrained("cgc-resnet50-cub", metrics={"accuracy": 0.81}, dataset="cub")
        >>> same = CGCModel.from_pretrained("cgc-resnet50-cub")
        >>> model.push_to_hub("me/cgc-resnet50-cub", private=True)
        >>> model.export_backbone("resnet50-cub")  # timm.create_model("local-dir:resnet50-cub")
    """

    config: CGCConfig
    backbone: nn.Module
    adapter: BackboneAdapter

    # ------------------------------------------------------------------------------ save
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        metrics: dict[str, float] | None = None,
        *,
        base_model: str | None = None,
        dataset: str | None = None,
        label_setting: str | None = None,
        figure: str | os.PathLike | None = None,
        repo_id: str | None = None,
        safe_serialization: bool = True,
        is_main_process: bool = True,
    ) -> Path:
        """Write ``config.json``, ``model.safetensors`` and a ``README.md`` model card.

        The folder is written under a temporary name and renamed into place, so it is never
        left half-written; an existing earlier save in ``save_directory`` is replaced whole.

        Args:
            save_directory: folder to create (or an empty folder, or an earlier save).
            metrics: evaluation results for the card, ``{name: value}``.
            base_model: Hub id of the checkpoint that was fine-tuned, for the card; by default
                the pretrained weights the backbone was created with (none for random init).
            dataset: dataset name or Hub id, for the card.
            label_setting: labels used in training, e.g. ``"1% labels"``, for the card.
            figure: image file of heatmaps; copied into the folder and shown in the card.
            repo_id: Hub id to show in the card's usage snippet.
            safe_serialization: accepted as in transformers; weights are always written as
                safetensors (pickle weights would need ``allow_pickle`` to load again).
            is_main_process: as in transformers' distributed saving: only the main process
                writes, the others return the folder without touching it.

        Returns:
            The folder written.

        Raises:
            CheckpointError: when the saved description would not rebuild this architecture
                (a timm instance built with constructor arguments cgc_hf did not see), or when
                ``save_directory`` holds other files.
        """
        if not is_main_process:
            return Path(save_directory)  # the main process writes the one copy
        if not safe_serialization:
            logger.warning(
                "safe_serialization=False: cgc_hf writes %s (safetensors) anyway; pickle "
                "weights could run code when loaded.",
                WEIGHTS_NAME,
            )
        figure_path = _check_figure(figure)
        self._check_rebuildable()
        config_dict = config_file_dict(self.config)
        card = model_card(
            self.config,
            base_model=base_model or self.config.base_model,
            license=self.adapter.license(self.backbone) if self.config.base_model else None,
            dataset=dataset,
            label_setting=label_setting,
            metrics=metrics,
            figure=figure_path,
            repo_id=repo_id,
        )

        def write(folder: Path) -> None:
            # save_model drops duplicate names of shared tensors, which save_file refuses.
            safetensors.torch.save_model(
                self, str(folder / WEIGHTS_NAME), metadata={"format": "pt"}
            )
            (folder / CONFIG_NAME).write_text(json.dumps(config_dict, indent=2, sort_keys=True))
            if figure_path is not None:
                shutil.copyfile(figure_path, folder / figure_path.name)
            (folder / CARD_NAME).write_text(card, encoding="utf-8")

        out = _write_atomically(Path(save_directory), write, is_cgc_folder, "saved cgc_hf model")
        logger.info("saved %s (%s) to %s", self.config.architecture, self.config.library, out)
        return out

    def _check_rebuildable(self) -> None:
        """Rebuild the backbone from the config (on the meta device) and compare state dicts."""
        cfg, adapter = self.config, self.adapter
        hidden = adapter.unrecordable_kwargs(self.backbone, cfg.backbone_config)
        if hidden:
            raise CheckpointError(
                f"the {cfg.library} backbone {cfg.architecture!r} was built with constructor "
                f"arguments {hidden} that a JSON config cannot hold (e.g. a layer class), so a "
                "reloaded model could compute something else. Build it with CGCModel.from_backbone("
                f"{cfg.architecture!r}, model_kwargs=...) using only plain values."
            )
        fix = adapter.rebuild_hint(self.backbone, cfg)
        with _rebuilding(cfg, f"saving it would give a folder that cannot be loaded. {fix}"):
            with torch.device("meta"):  # structure only: no memory, no initialisation cost
                rebuilt = adapter.rebuild(cfg.architecture, cfg.backbone_config)
        problems = state_dict_diff(self.backbone.state_dict(), rebuilt.state_dict())
        if problems:
            raise CheckpointError(
                f"config.backbone_config rebuilds a different {cfg.library} architecture than "
                f"the model's backbone {cfg.architecture!r} ({problems}), so the saved folder "
                f"could not be loaded. {fix}"
            )

    # ------------------------------------------------------------------------------ load
    @classmethod
    def from_pretrained(
        cls: type[M],
        repo_id_or_dir: str | os.PathLike,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        cache_dir: str | os.PathLike | None = None,
        allow_pickle: bool = False,
        strict: bool = True,
        device: str | torch.device = "cpu",
        num_labels: int | None = None,
        force_download: bool = False,
        map_location: str | torch.device | None = None,
    ) -> M:
        """Load a model saved with :meth:`save_pretrained`, from a folder or a Hub repository.

        The architecture is rebuilt from ``config.json`` with random weights (no backbone
        download), then ``model.safetensors`` is loaded. A local folder never touches the
        network; a Hub id goes through the Hub cache (``snapshot_download``). Like
        transformers, the model is returned in eval mode; call ``.train()`` to fine-tune on.

        Args:
            repo_id_or_dir: local folder, or Hub id ``"org/name"``.
            revision: branch, tag or commit of a Hub repository.
            token: Hub token for private or gated repositories (never written or logged).
            local_files_only: use only the local Hub cache; ``HF_HUB_OFFLINE=1`` does the same.
            cache_dir: Hub cache folder (default: the huggingface_hub cache).
            allow_pickle: accept a ``pytorch_model.bin`` when there is no ``model.safetensors``;
                it is read with ``torch.load(weights_only=True)``. Only for trusted sources.
            strict: every saved key must match the model (missing or unexpected keys raise);
                with ``False`` they are logged as warnings. Shapes must always match.
            device: where to put the loaded model.
            num_labels: expected number of classes; a different saved value raises.
            force_download: download again even when cached.
            map_location: the same as ``device`` (the name ``torch.load`` and
                ``PyTorchModelHubMixin`` use).

        Returns:
            The model, in eval mode, on ``device``.

        Raises:
            CheckpointError: the source is missing, not in the cache when offline, not a cgc_hf
                model, holds only pickle weights without ``allow_pickle``, is corrupted, or
                does not match the rebuilt architecture.
        """
        if map_location is not None:
            if str(device) != "cpu" and torch.device(device) != torch.device(map_location):
                raise CGCValueError(
                    f"device={str(device)!r} and map_location={str(map_location)!r} disagree; "
                    "pass one of them."
                )
            device = map_location
        hub = HubOptions(revision, cache_dir, token)
        folder = _resolve_folder(
            repo_id_or_dir, hub, local_files_only, allow_pickle, force_download
        )
        config = read_config(folder, num_labels)
        state = read_weights(folder, allow_pickle)
        with _rebuilding(config, f"saved in {folder}; it may need a newer {config.library}."):
            model = cls(config)
        load_state(model, state, strict, folder)
        model.to(device)
        model.eval()  # documented: loaded models are for inference until .train() is called
        return model

    # ------------------------------------------------------------------------------ push
    @staticmethod
    def create_hub_repo(
        repo_id: str, private: bool | None = None, token: str | None = None
    ) -> tuple[str, Any]:
        """Create the Hub repository ``repo_id`` if missing; return its full id and the client.

        A recipe calls this before training, so a bad token or no network is found at once, not
        after hours of training; pass the client on to :meth:`push_to_hub` (``hub_api=``). Any
        failure is one :class:`CGCValueError` line.
        """
        try:
            api = HfApi(token=token, library_name="cgc_hf")
            url = api.create_repo(
                repo_id=repo_id, private=private, exist_ok=True, repo_type="model"
            )
        except Exception as err:  # offline, no token, no permission, bad id: all user-fixable
            text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CGCValueError(
                f"push_to_hub: the Hub repository {repo_id!r} cannot be created "
                f"({type(err).__name__}: {text}). Check the network (HF_HUB_OFFLINE), the token "
                "(--token or `hf auth login`) and the id, or run without --push_to_hub."
            ) from None
        return getattr(url, "repo_id", None) or repo_id, api

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload CGC model (cgc_hf)",
        create_pr: bool = False,
        revision: str | None = None,
        branch: str | None = None,
        metrics: dict[str, float] | None = None,
        hub_api: Any = None,
        **card_kwargs: Any,
    ) -> CommitInfo:
        """Save to a temporary folder and upload it to ``repo_id`` in one commit.

        Args:
            repo_id: Hub id ``"org/name"``; the repository is created when missing.
            private: visibility of a created repository (``None``: the account's default).
            token: Hub token; passed to the client only, never written or logged.
            commit_message: message of the upload commit.
            create_pr: open a pull request instead of committing to the branch.
            revision: branch to commit to (default ``main``); created from ``main`` when
                missing.
            branch: the same as ``revision`` (``PyTorchModelHubMixin.push_to_hub``'s name).
            metrics: evaluation results for the model card.
            hub_api: the client :meth:`create_hub_repo` returned (the repository then exists).
            **card_kwargs: ``base_model``, ``dataset``, ``label_setting``, ``figure`` for the card.

        Returns:
            The commit information from ``HfApi.upload_folder`` (a string: the commit URL).
        """
        import tempfile

        if branch is not None:
            if revision is not None and revision != branch:
                raise CGCValueError(
                    f"revision={revision!r} and branch={branch!r} disagree; pass one of them."
                )
            revision = branch
        if hub_api is None:
            repo_id, hub_api = self.create_hub_repo(repo_id, private=private, token=token)
        api = hub_api
        if revision is not None and not create_pr:
            # upload_folder refuses a branch that does not exist yet
            api.create_branch(repo_id=repo_id, branch=revision, exist_ok=True, repo_type="model")
        with tempfile.TemporaryDirectory(prefix="cgc_hf-push-") as tmp:
            folder = self.save_pretrained(
                Path(tmp) / "model", metrics=metrics, repo_id=repo_id, **card_kwargs
            )
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                repo_type="model",
                commit_message=commit_message,
                revision=revision,
                create_pr=create_pr,
            )
        logger.info("pushed %s to the Hub repository %s", self.config.architecture, repo_id)
        return info

    # ------------------------------------------------------------------------------ export
    def export_backbone(self, save_directory: str | os.PathLike) -> Path:
        """Write the fine-tuned classifier in its own library's format, loadable without cgc_hf.

        timm: ``config.json`` in timm's Hub format (architecture, ``num_classes``,
        ``label_names``, ``model_args``, ``pretrained_cfg``) and ``model.safetensors``, written by
        ``timm.models.save_for_hf``; load with
        ``timm.create_model("local-dir:<dir>", pretrained=True)``.
        transformers: ``backbone.save_pretrained``; load with
        ``AutoModelForImageClassification.from_pretrained(<dir>)``.

        Args:
            save_directory: folder to create (or an empty folder, or an earlier export).

        Returns:
            The folder written.
        """
        backbone, cfg = self.backbone, self.config

        def write(folder: Path) -> None:
            self.adapter.export(backbone, folder, cfg)

        out = _write_atomically(Path(save_directory), write, is_export_folder, "backbone export")
        logger.info("exported the %s backbone %s to %s", cfg.library, cfg.architecture, out)
        return out


# ---------------------------------------------------------------------------------- writing
def _check_figure(figure: str | os.PathLike | None) -> Path | None:
    if figure is None:
        return None
    path = Path(figure)
    if not path.is_file():
        raise CGCValueError(f"figure must be an existing image file; got {str(figure)!r}.")
    if path.name in RESERVED_NAMES:
        raise CGCValueError(
            f"figure must not be named {path.name!r} (a file of the saved model); rename it, "
            "e.g. to 'heatmaps.png'."
        )
    return path


def _write_atomically(
    dest: Path, write: Callable[[Path], None], replaceable: Callable[[Path], bool], what: str
) -> Path:
    """Run ``write`` into a sibling temporary folder, then rename it to ``dest``."""
    dest = dest.expanduser()
    if dest.exists() and not dest.is_dir():
        raise CheckpointError(f"save_directory {str(dest)!r} is a file; give a folder path.")
    if dest.is_dir() and any(dest.iterdir()) and not replaceable(dest):
        names = sorted(p.name for p in dest.iterdir())[:8]
        raise CheckpointError(
            f"save_directory {str(dest)!r} already holds files that are not a {what} "
            f"({names}); saving replaces the folder whole, so give a new or empty folder."
        )
    try:
        return replace_folder(dest, write)
    except OSError as err:
        raise CheckpointError(f"could not write {what} to {str(dest)!r}: {err}") from err


@contextmanager
def _rebuilding(config: CGCConfig, consequence: str) -> Iterator[None]:
    """Report an error of the backbone library while the block rebuilds ``config``'s
    architecture as one :class:`CheckpointError` line, followed by ``consequence``."""
    try:
        yield
    except (TypeError, ValueError, RuntimeError, KeyError) as err:
        raise CheckpointError(
            f"cannot rebuild the {config.library} backbone {config.architecture!r} from "
            f"config.backbone_config ({type(err).__name__}: {err}); {consequence}"
        ) from err


# ---------------------------------------------------------------------------------- reading
def _offline_env() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; read it again so a later setting counts.
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _resolve_folder(
    repo_id_or_dir: str | os.PathLike,
    hub: HubOptions,
    local_files_only: bool,
    allow_pickle: bool,
    force_download: bool,
) -> Path:
    """The local folder of a saved model: the folder itself, or a Hub snapshot in the cache."""
    path = Path(repo_id_or_dir).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(
            f"repo_id_or_dir {str(repo_id_or_dir)!r} is a file; give the folder that holds "
            f"{CONFIG_NAME} and {WEIGHTS_NAME}."
        )
    repo_id = str(repo_id_or_dir)
    offline = local_files_only or _offline_env()
    patterns = [CONFIG_NAME, WEIGHTS_NAME] + ([PICKLE_WEIGHTS_NAME] if allow_pickle else [])
    at = f" at revision {hub.revision!r}" if hub.revision else ""
    try:
        folder = snapshot_download(
            repo_id,
            **hub.kwargs(),
            local_files_only=offline,
            force_download=force_download,
            allow_patterns=patterns,
            library_name="cgc_hf",
        )
    except HFValidationError:
        raise CheckpointError(
            f"repo_id_or_dir {repo_id!r} is neither an existing local folder nor a Hub repo id "
            "('org/name'); check the path."
        ) from None
    except LocalEntryNotFoundError:
        why = (
            "local_files_only=True / HF_HUB_OFFLINE=1 forbid downloading"
            if offline
            else "the Hub could not be reached"
        )
        raise CheckpointError(
            f"{repo_id!r}{at} is not in the local cache; {why}. Download it once with network "
            f"access (`hf download {repo_id}`), pass the cache_dir= that holds it, or pass a local "
            "folder written by save_pretrained."
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(
            f"Hub repository {repo_id!r} has no revision {hub.revision!r}."
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"Hub repository {repo_id!r} was not found (a private or gated repository needs "
            "token=...); check the id."
        ) from None
    except HfHubHTTPError as err:
        raise CheckpointError(
            f"downloading {repo_id!r}{at} from the Hub failed: {str(err).splitlines()[0]}"
        ) from None
    return Path(folder)
