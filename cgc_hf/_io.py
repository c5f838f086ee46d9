"""Writing files so that a reader (or a crash) never sees half of one, and keeping secrets out.

Every JSON record of a run, every saved model folder and every checkpoint goes through here: a
file is written under a temporary sibling name and renamed into place (a rename within one
folder is atomic on POSIX), and a folder replaces an earlier one in two renames, with the earlier
one restored if the second fails. Secrets are removed by one rule, :func:`redact`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_SECRET_KEY = re.compile(r"token|password|secret", re.IGNORECASE)
# A Hugging Face access token: also caught where no key names it (an unknown flag's value).
_HF_TOKEN = re.compile(r"hf_[A-Za-z0-9]{20,}")


def write_file(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Run ``write`` on a temporary sibling of ``path``, then rename it into place.

    Readers never see half a file, and a write that fails (or is killed) leaves no partial
    ``path``; the temporary ``.<name>.tmp-<tag>`` is removed on failure.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, data: Any, sort_keys: bool = True) -> None:
    """Write ``data`` as JSON through :func:`write_file`.

    ``sort_keys=False`` keeps the order of the mappings (e.g. models in the order compared).
    """
    text = json.dumps(data, indent=2, sort_keys=sort_keys, default=str)
    write_file(path, lambda tmp: tmp.write_text(text))


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in ``path``, or ``None`` when it is missing or not (complete) JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def replace_folder(dest: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write`` into a temporary sibling folder, then put it in place of ``dest``.

    The temporary folder is ``.<name>.tmp-<tag>``; an earlier ``dest`` is moved aside to
    ``.<name>.old-<tag>`` for the moment of the swap. Leftovers of an earlier call that was killed
    (only those two patterns, next to ``dest``) are cleaned first: a moved-aside folder whose
    ``dest`` is gone is put back, since it is the last complete save.

    Raises:
        OSError: whatever ``write`` or the renames raise; ``dest`` is then as it was.
    """
    dest = dest.expanduser()
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(dest)
    tag = uuid.uuid4().hex[:8]
    tmp = dest.parent / f".{dest.name}.tmp-{tag}"
    tmp.mkdir()  # plain mkdir (not mkdtemp) so the folder gets the user's usual permissions
    try:
        write(tmp)
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{tag}"
            os.rename(dest, old)
            try:
                os.rename(tmp, dest)
            except OSError:
                os.rename(old, dest)  # put the earlier save back
                raise
            shutil.rmtree(old)
        else:
            os.rename(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def clean_leftovers(dest: Path) -> list[Path]:
    """Remove what a killed :func:`replace_folder` into ``dest`` left behind; return it."""
    removed = []
    if not dest.parent.is_dir():
        return removed
    pattern = re.compile(rf"\.{re.escape(dest.name)}\.(tmp|old)-[0-9a-f]{{8}}")
    for path in sorted(dest.parent.iterdir()):
        found = pattern.fullmatch(path.name)
        if found is None or not path.is_dir():
            continue
        if found.group(1) == "old" and not dest.exists():
            logger.warning("restoring %s from %s (a save was interrupted)", dest, path)
            os.rename(path, dest)
            continue
        logger.warning("removing %s (left by an interrupted save)", path)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def redact(data: Any, secrets: Iterable[str | None] = ()) -> Any:
    """``data`` without secrets, for anything that is written or logged.

    One rule, by key and by value: a dict entry whose key names a secret (``token``,
    ``password``, ``secret``) is dropped, and so is any string holding a secret value (one of
    ``secrets``, or anything shaped like a Hugging Face token). In a command line (a list of
    strings) a flag that names a secret is dropped with its value, whatever its spelling
    (``--hub_token X``, ``--hub_token=X``), and so is the flag before a secret value.
    """
    values = tuple(s for s in secrets if s)

    def secret_text(text: str) -> bool:
        return any(s in text for s in values) or bool(_HF_TOKEN.search(text))

    def walk(d: Any) -> Any:
        if isinstance(d, dict):
            return {k: walk(v) for k, v in d.items() if not _SECRET_KEY.search(str(k))}
        if isinstance(d, (list, tuple)):
            return _redact_sequence(list(d), secret_text, walk)
        if isinstance(d, str) and secret_text(d):
            return "<redacted>"
        return d

    return walk(data)


def scrub(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with every secret value in it (as :func:`redact` finds them) replaced."""
    for secret in (s for s in secrets if s):
        text = text.replace(secret, "<redacted>")
    return _HF_TOKEN.sub("<redacted>", text)


def _bare_flag(item: Any) -> bool:
    return isinstance(item, str) and item.startswith("--") and "=" not in item


def _redact_sequence(items: list, secret_text: Callable[[str], bool], walk: Callable) -> list:
    out, skip_next = [], False
    for i, item in enumerate(items):
        if skip_next:
            skip_next = False
            if isinstance(item, str) and not item.startswith("--"):
                continue
        if isinstance(item, str):
            flag = item.startswith("-") and _SECRET_KEY.search(item.split("=", 1)[0])
            if flag or secret_text(item):
                skip_next = bool(flag) and "=" not in item and i + 1 < len(items)
                if not flag and out and _bare_flag(out[-1]):
                    out.pop()  # the flag this secret is the value of, whatever its name
                continue
        out.append(walk(item))
    return out
