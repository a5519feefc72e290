"""Push an export folder to the Hugging Face Hub (or print what would be pushed).

The token comes from HF_TOKEN or the login cache (``huggingface_hub.get_token``) and is resolved
before any other work, so a missing token fails in a second rather than after building an upload.
It is passed to HfApi and nowhere else: never printed, and scrubbed from any error we re-raise.
``HF_ENDPOINT`` is read at call time, so a stand-in server (tests, a mirror) can be chosen per call.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Tuple

_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")
DEFAULT_ENDPOINT = "https://huggingface.co"


class HubError(RuntimeError):
    """A push could not be done; the message says why (and never contains the token)."""


@dataclass
class PushPlan:
    folder: Path
    repo_id: str
    private: bool
    revision: Optional[str]
    commit_message: str
    files: List[Tuple[str, int]] = field(default_factory=list)  # (path in repo, bytes)

    def render(self) -> str:
        total = sum(s for _, s in self.files)
        lines = [
            f"repo_id: {self.repo_id}",
            f"private: {self.private}",
            f"revision: {self.revision or 'main'}",
            f"commit message: {self.commit_message}",
            f"files ({len(self.files)}, {_size(total)}):",
        ]
        lines += [f"  {name}  {_size(size)}" for name, size in self.files]
        return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def validate_repo_id(repo_id: Optional[str]) -> str:
    """'user/name' with Hub-legal characters; a clear error otherwise."""
    if not repo_id or not isinstance(repo_id, str):
        raise HubError(
            "export.repo_id is not set; give it as 'user/name' (e.g. export.repo_id=alice/qwen3-8b-dspark)"
        )
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts):
        raise HubError(f"export.repo_id={repo_id!r} is not a valid repo id: expected exactly 'user/name'")
    for part in parts:
        if not _NAME.match(part) or "--" in part or ".." in part or len(part) > 96:
            raise HubError(
                f"export.repo_id={repo_id!r} is not a valid repo id: {part!r} may only hold letters, digits, "
                "'-', '_' and '.', must start and end with a letter or digit, no '--' or '..', at most 96 chars"
            )
    return repo_id


def resolve_token() -> Optional[str]:
    tok = os.environ.get("HF_TOKEN") or None
    if tok is None:
        from huggingface_hub import get_token

        tok = get_token()
    return tok or None


def plan_push(
    folder,
    repo_id: str,
    private: bool = False,
    revision: Optional[str] = None,
    commit_message: str = "Upload DSpark drafter",
) -> PushPlan:
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        raise HubError(f"{folder}: nothing to upload (not a folder, or empty)")
    files = sorted(
        (p.relative_to(folder).as_posix(), p.stat().st_size)
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    return PushPlan(folder, validate_repo_id(repo_id), bool(private), revision or None, commit_message, files)


def push_folder(
    folder,
    repo_id: str,
    private: bool = False,
    revision: Optional[str] = None,
    commit_message: str = "Upload DSpark drafter",
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
) -> PushPlan:
    """Create the repo (and branch), upload the folder in one commit; ``dry_run`` only prints the plan."""
    plan = plan_push(folder, repo_id, private, revision, commit_message)
    if dry_run:
        found = resolve_token() is not None
        echo(
            "dry run: nothing is uploaded\n"
            + plan.render()
            + f"\ntoken: {'found' if found else 'NOT found (a real push would fail: set HF_TOKEN or log in)'}"
        )
        return plan
    token = resolve_token()
    if token is None:
        raise HubError("no Hugging Face token: set HF_TOKEN or run `hf auth login`; nothing was uploaded")
    endpoint = os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    try:
        from huggingface_hub import HfApi

        api = HfApi(endpoint=endpoint, token=token)
        api.create_repo(plan.repo_id, private=plan.private, exist_ok=True, repo_type="model")
        if plan.revision and plan.revision != "main":
            api.create_branch(plan.repo_id, branch=plan.revision, exist_ok=True, repo_type="model")
        api.upload_folder(
            folder_path=str(plan.folder),
            repo_id=plan.repo_id,
            repo_type="model",
            revision=plan.revision,
            commit_message=plan.commit_message,
            ignore_patterns=[".*", "**/.*"],
        )
    except Exception as e:  # noqa: BLE001 - re-raised with the token scrubbed and no chained context
        why = _scrub(f"{type(e).__name__}: {e}", token)
        raise HubError(f"push to {plan.repo_id} at {endpoint} failed: {why}") from None
    echo(
        f"pushed {len(plan.files)} files to {endpoint.rstrip('/')}/{plan.repo_id}"
        + (f" (revision {plan.revision})" if plan.revision else "")
    )
    return plan


def _scrub(text: str, token: str) -> str:
    return text.replace(token, "***") if token else text
