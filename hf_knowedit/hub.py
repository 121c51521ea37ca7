"""Where artifacts come from and go to: local directories and Hub repos, through huggingface_hub.

Repo ids are resolved with `snapshot_download`, so the HF cache, `HF_ENDPOINT` mirrors and `HF_HUB_OFFLINE=1` behave
as everywhere else in the ecosystem.
"""

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import ArtifactError


def resolve_artifact_dir(
    path_or_repo_id: str | os.PathLike,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Path:
    """A local directory holding the artifact: `path_or_repo_id` itself, or its snapshot from the Hub."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        directory = path / subfolder if subfolder else path
        if not directory.is_dir():
            raise ArtifactError(f"{directory} does not exist: {path} has no subfolder {subfolder!r}.")
        return directory
    text = str(path_or_repo_id)
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or path.exists():
        raise ArtifactError(f"The artifact directory {text} does not exist. Check the path, or give a Hub repo id.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = [f"{subfolder}/*"] if subfolder else None
    try:
        snapshot = snapshot_download(
            text,
            revision=revision,
            token=token,
            cache_dir=cache_dir if cache_dir is not None else hub_cache_dir(),
            local_files_only=local_files_only or hub_offline(),
            allow_patterns=patterns,
        )
    except LocalEntryNotFoundError as error:
        raise ArtifactError(
            f"{text} is neither a local directory nor in the Hugging Face cache ({cache_dir or hub_cache_dir()}), "
            f"and the Hub cannot be reached (offline mode: {hub_offline()}). Download it once online, or give a "
            "local path."
        ) from error
    except RepositoryNotFoundError as error:
        raise ArtifactError(f"No Hub repo named {text} (or it is private: pass token=...).") from error
    except (HfHubHTTPError, ValueError, OSError) as error:
        raise ArtifactError(f"Could not fetch {text} from the Hub: {error}") from error
    directory = Path(snapshot) / subfolder if subfolder else Path(snapshot)
    if not directory.is_dir():
        raise ArtifactError(f"The Hub repo {text} has no folder {subfolder!r}.")
    return directory


def hub_cache_dir() -> Path:
    """The Hub cache, read from `HF_HUB_CACHE` (or `HF_HOME`, `XDG_CACHE_HOME`) at call time.

    `huggingface_hub` reads these variables once, when it is imported; reading them here too lets a variable set
    later in the process (a test, a notebook) take effect.
    """
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "huggingface" / "hub"


def hub_offline() -> bool:
    """Whether `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) is set now, or was when `huggingface_hub` was imported."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or value.strip().lower() in ("1", "on", "yes", "true")


@contextmanager
def atomic_directory(target: str | os.PathLike):
    """Yield a temporary directory beside `target`; on success it replaces `target`, on failure it vanishes.

    Nothing half-written is ever left at `target`: an existing artifact there is swapped out only after the new one
    is complete, and restored if the swap fails.
    """
    target = Path(target).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise ArtifactError(f"{target} exists and is not a directory; choose another output path.")
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        backup = None
        if target.exists():
            backup = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, backup)
        try:
            os.replace(staging, target)
        except BaseException:
            if backup is not None:
                os.replace(backup, target)
            raise
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str = "Upload edit with hf-knowedit",
    revision: str | None = None,
    create_pr: bool = False,
):
    """Create `repo_id` if needed and upload `folder` to it; returns huggingface_hub's commit info."""
    from huggingface_hub import create_repo, upload_folder

    repo_url = create_repo(repo_id, private=private, token=token, exist_ok=True)
    return upload_folder(
        repo_id=repo_url.repo_id,
        folder_path=str(folder),
        token=token,
        commit_message=commit_message,
        revision=revision,
        create_pr=create_pr,
    )
