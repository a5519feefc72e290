"""Push an existing export folder to the Hugging Face Hub.

    python scripts/push_to_hub.py EXPORT_DIR --repo-id user/name [--private] [--revision BRANCH]
        [--commit-message MSG] [--dry-run]

The token comes from HF_TOKEN or the login cache (`hf auth login`); HF_ENDPOINT selects another Hub.
The folder is uploaded as it is: run `python deepspec/export.py check EXPORT_DIR` first, or export
with `export.push_to_hub=true`, which checks before it pushes.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deepspec.exporting.hub import HubError, push_folder  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", help="export folder to upload")
    ap.add_argument("--repo-id", required=True, help="'user/name' on the Hub")
    ap.add_argument(
        "--private", action="store_true", help="create the repo as private (if it does not exist)"
    )
    ap.add_argument("--revision", default=None, help="branch to push to (created if missing); default main")
    ap.add_argument("--commit-message", default="Upload DSpark drafter")
    ap.add_argument("--dry-run", action="store_true", help="print what would be uploaded; upload nothing")
    args = ap.parse_args(argv)
    try:
        push_folder(args.folder, args.repo_id, args.private, args.revision, args.commit_message, args.dry_run)
    except HubError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
