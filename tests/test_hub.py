"""Hub push against a local stand-in for the Hub HTTP API (127.0.0.1 only; it records every request).

The stand-in implements what huggingface_hub 2.4 calls for create_repo, create_branch and
upload_folder: POST /api/repos/create, POST /api/models/{repo}/branch/{rev}, POST .../preupload/{rev}
(answering "regular" for every file, so no LFS/Xet transfer happens) and POST .../commit/{rev}
(an ndjson body with base64 file contents, decoded and kept here).
"""

from __future__ import annotations

import base64
import importlib.util
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch
from export_fixtures import tiny_drafter, tiny_target
from openai_standin import send_json

from deepspec.config import ExportConfig
from deepspec.exporting.hub import HubError, push_folder, validate_repo_id
from deepspec.exporting.native import save_native
from deepspec.exporting.pipeline import run_export

TOKEN = "hf_standinSECRETtoken_0123456789"
ROOT = Path(__file__).resolve().parents[1]


class StandInHub:
    """A threaded HTTP server with just enough of the Hub API; ``requests`` records (method, path, body)."""

    def __init__(self):
        self.requests, self.repos, self.files = [], {}, {}
        self.unknown = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10  # a stuck client cannot hang the test run

            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path == "/api/agent-harnesses":  # huggingface_hub's user-agent registry: none here
                    return send_json(self, 200, {"standardEnvVars": [], "harnesses": {}})
                hub.requests.append(
                    ("GET", urlsplit(self.path).path, None, self.headers.get("Authorization"))
                )
                m = re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/(.+))?$", urlsplit(self.path).path)
                if m and m.group(1) in hub.repos:
                    return send_json(self, 200, {"id": m.group(1), "sha": "b" * 40, "siblings": []})
                hub.unknown.append(("GET", self.path))
                send_json(self, 404, {"error": "not found"})

            def do_POST(self):
                path = urlsplit(self.path).path
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                auth = self.headers.get("Authorization")
                hub.requests.append(("POST", path, body, auth))
                if path == "/api/repos/create":
                    p = json.loads(body)
                    repo = f"{p['organization']}/{p['name']}"
                    if p["name"] == "forbidden":  # echo the auth header: the client must not leak it onwards
                        return send_json(self, 403, {"error": f"no write access for {auth}"})
                    hub.repos[repo] = {"payload": p, "branches": ["main"]}
                    return send_json(self, 200, {"url": f"{hub.url}/{repo}", "name": repo})
                if path == "/api/validate-yaml":
                    return send_json(self, 200, {"errors": [], "warnings": []})
                m = re.match(r"^/api/models/([^/]+/[^/]+)/(branch|preupload|commit)/(.+)$", path)
                if not m or m.group(1) not in hub.repos:
                    hub.unknown.append(("POST", self.path))
                    return send_json(self, 404, {"error": "Repository not found"})
                repo, op, rev = m.group(1), m.group(2), unquote(m.group(3))
                if op == "branch":
                    hub.repos[repo]["branches"].append(rev)
                    return send_json(self, 200, {})
                if rev not in hub.repos[repo]["branches"]:
                    return send_json(self, 404, {"error": f"Revision {rev} not found"})
                if op == "preupload":
                    files = json.loads(body)["files"]
                    return send_json(
                        self,
                        200,
                        {
                            "files": [
                                {
                                    "path": f["path"],
                                    "uploadMode": "regular",
                                    "shouldIgnore": False,
                                    "oid": None,
                                }
                                for f in files
                            ]
                        },
                    )
                lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
                commit = {"revision": rev, "header": lines[0]["value"], "files": {}}
                for item in lines[1:]:
                    assert item["key"] == "file", item  # regular uploads only
                    commit["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                hub.files.setdefault(repo, []).append(commit)
                return send_json(
                    self,
                    200,
                    {
                        "commitUrl": f"{hub.url}/{repo}/commit/{'c' * 40}",
                        "commitOid": "c" * 40,
                        "pullRequestUrl": None,
                    },
                )

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture()
def hub(monkeypatch, tmp_path):
    import socket

    import huggingface_hub.constants as hc

    server = StandInHub()
    # Nothing but the stand-in may be reached: any other host name fails loudly and is recorded.
    real_getaddrinfo, outside = socket.getaddrinfo, []

    def local_only(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost"):
            outside.append(host)
            raise OSError(f"test blocked a connection to {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", local_only)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    # huggingface_hub read HF_ENDPOINT at import for a few side requests (its user-agent registry);
    # point those at the stand-in too, as a process started with HF_ENDPOINT set would.
    monkeypatch.setattr(hc, "ENDPOINT", server.url)
    monkeypatch.setattr(hc, "AGENT_HARNESSES_PATH", str(tmp_path / "hf-home" / "agents.json"), raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # The login cache, pointed at an empty place so no real credential is ever read.
    monkeypatch.setattr(hc, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(hc, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-home" / "stored_tokens"))
    yield server
    server.close()
    assert not outside, f"connections outside 127.0.0.1 were attempted: {outside}"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.set_num_threads(1)
    t = tiny_target("qwen3")
    run = tmp_path_factory.mktemp("run")
    save_native(tiny_drafter(t), run / "drafter")
    (run / "eval.json").write_text(
        json.dumps({"temperatures": {"0.0": {"temperature": 0.0, "tau": 2.5, "acceptance_rate": 0.375}}})
    )
    return run


def _cfg(run_dir, out, **kw):
    kw.setdefault("repo_id", "alice/tiny-dspark")
    kw.setdefault("base_model", "Qwen/Qwen3-0.6B")  # a push names a verifier others can load
    return ExportConfig(checkpoint=str(run_dir), output_dir=str(out), push_to_hub=True, **kw)


def _all_text(folder: Path) -> str:
    return "".join(p.read_bytes().decode("latin-1") for p in folder.rglob("*") if p.is_file())


def test_push_records_repo_private_revision_files(hub, run_dir, tmp_path, capsys, caplog):
    caplog.set_level("DEBUG")
    out = tmp_path / "exp"
    res = run_export(_cfg(run_dir, out, private=True, revision="v1", commit_message="first drafter"))
    create = [json.loads(b) for m, p, b, _ in hub.requests if p == "/api/repos/create"]
    assert create == [
        {"name": "tiny-dspark", "organization": "alice", "visibility": "private", "type": "model"}
    ]
    assert hub.repos["alice/tiny-dspark"]["branches"] == ["main", "v1"]
    commits = hub.files["alice/tiny-dspark"]
    assert [c["revision"] for c in commits] == ["v1"] and commits[0]["header"]["summary"] == "first drafter"
    uploaded = commits[0]["files"]
    assert set(uploaded) == {
        "README.md",
        "config.json",
        "model.safetensors",
        "deepspec/extra.safetensors",  # the greedy confidence output travels with the export
        "deepspec_export.json",
    }
    assert uploaded["config.json"] == (out / "config.json").read_bytes()
    assert uploaded["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert "2.500" in uploaded["README.md"].decode()  # the card carries the run's τ
    assert {a for *_, a in hub.requests} == {f"Bearer {TOKEN}"}  # the token was used, on every request
    assert not hub.unknown, hub.unknown
    assert res.push.repo_id == "alice/tiny-dspark" and res.push.private is True
    # ...and written nowhere: export files, uploaded bytes, printed output, logs.
    captured = capsys.readouterr()
    for text in (
        _all_text(out),
        b"".join(uploaded.values()).decode("latin-1"),
        captured.out,
        captured.err,
        caplog.text,
    ):
        assert TOKEN not in text


def test_push_public_to_main_with_cached_login(hub, run_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.delenv("HF_TOKEN")
    Path(hc.HF_TOKEN_PATH).parent.mkdir(parents=True)
    Path(hc.HF_TOKEN_PATH).write_text(TOKEN)
    run_export(_cfg(run_dir, tmp_path / "exp"))
    create = json.loads(next(b for m, p, b, _ in hub.requests if p == "/api/repos/create"))
    assert create.get("visibility") in (None, "public")
    assert not any("/branch/" in p for _, p, _, _ in hub.requests)
    assert [c["revision"] for c in hub.files["alice/tiny-dspark"]] == ["main"]
    assert {a for *_, a in hub.requests} == {f"Bearer {TOKEN}"}


def test_dry_run_prints_and_uploads_nothing(hub, run_dir, tmp_path, capsys):
    run_export(_cfg(run_dir, tmp_path / "exp", dry_run=True, private=True, revision="v2"))
    out = capsys.readouterr().out
    assert hub.requests == []
    for needle in (
        "dry run: nothing is uploaded",
        "repo_id: alice/tiny-dspark",
        "private: True",
        "revision: v2",
        "model.safetensors",
        "README.md",
        "config.json",
        "token: found",
    ):
        assert needle in out, needle
    assert re.search(r"model\.safetensors\s+[\d.]+ KB", out)
    assert TOKEN not in out
    assert (tmp_path / "exp" / "model.safetensors").exists()  # dry run still builds everything


def test_missing_token_fails_before_any_work(hub, run_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match="no Hugging Face token: set HF_TOKEN"):
        run_export(_cfg(run_dir, tmp_path / "exp"))
    assert hub.requests == [] and not (tmp_path / "exp").exists()
    with pytest.raises(HubError, match="no Hugging Face token"):
        push_folder(run_dir / "drafter", "alice/x")
    assert hub.requests == []


@pytest.mark.parametrize(
    "bad", ["", "no-slash", "a/b/c", "user/-bad", "user/na--me", "us er/name", "user/", "user/" + "x" * 97]
)
def test_invalid_repo_id(hub, run_dir, tmp_path, bad):
    with pytest.raises(HubError, match="repo_id"):
        run_export(_cfg(run_dir, tmp_path / "exp", repo_id=bad))
    assert hub.requests == [] and not (tmp_path / "exp").exists()
    assert validate_repo_id("Org-1/model_v2.0") == "Org-1/model_v2.0"


def test_server_error_never_echoes_the_token(hub, run_dir, tmp_path):
    with pytest.raises(HubError) as e:
        push_folder(run_dir / "drafter", "alice/forbidden")
    assert "alice/forbidden" in str(e.value) and "403" in str(e.value)
    assert TOKEN not in str(e.value) and "***" in str(e.value)
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_push_script(hub, run_dir, capsys):
    spec = importlib.util.spec_from_file_location("push_to_hub", ROOT / "scripts" / "push_to_hub.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main([str(run_dir / "drafter"), "--repo-id", "bob/native", "--dry-run"]) == 0
    assert hub.requests == [] and "repo_id: bob/native" in capsys.readouterr().out
    assert mod.main([str(run_dir / "drafter"), "--repo-id", "bob/native", "--revision", "exp"]) == 0
    assert set(hub.files["bob/native"][0]["files"]) == {
        "config.json",
        "model.safetensors",
        "deepspec/extra.safetensors",
    }
    assert hub.files["bob/native"][0]["revision"] == "exp"
    assert mod.main([str(run_dir / "drafter"), "--repo-id", "not valid"]) == 1
