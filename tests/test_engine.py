"""The engine round trip's parts that need no vLLM: statistics and their intervals, the serving
settings, process clean-up (by process id, port freed, on error and interrupt) and the one-line
errors when vLLM is missing or fails."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from deepspec.engine import stats
from deepspec.engine.procs import EngineError, port_in_use, run_to_end, started, stop
from deepspec.engine.serving import serve_command, serving_settings

PC = stats.PromptCounts


def test_tau_and_per_position_from_counts():
    counts = [PC(4, 6, [3, 2, 1]), PC(2, 1, [1, 0, 0])]
    s = stats.summary(counts, 3)
    assert s["tau"] == pytest.approx(1 + 7 / 6)
    assert s["per_position_acceptance"] == pytest.approx([4 / 6, 2 / 6, 1 / 6])
    # cluster (ratio) standard error: residuals a_i - rho r_i = 6 - 4*7/6, 1 - 2*7/6
    rho = 7 / 6
    se = (2 * ((6 - 4 * rho) ** 2 + (1 - 2 * rho) ** 2)) ** 0.5 / 6
    assert s["tau_se"] == pytest.approx(se)
    assert s["tau_ci95"] == pytest.approx([s["tau"] - 1.959964 * se, s["tau"] + 1.959964 * se])


def test_from_rounds_matches_deepspec_round_records():
    from deepspec.eval.spec_decode import RoundRecord

    rounds = [RoundRecord(3, 3, 2), RoundRecord(3, 3, 0), RoundRecord(3, 3, 3)]
    c = stats.from_rounds(rounds, 3)
    assert (c.rounds, c.accepted, c.per_pos) == (3, 5, [2, 2, 1])


def test_paired_margin_identical_runs_floor_and_consistent_shift():
    same = [PC(10, 8, []), PC(5, 2, []), PC(7, 7, [])]
    assert stats.paired_margin(same, same) == stats.PAIRED_FLOOR
    # Every prompt loses the same share of acceptance: the paired interval stays narrow, so a
    # systematic loss is caught even where the unpaired interval is wide.
    lower = [PC(10, 4, []), PC(5, 1, []), PC(7, 3, [])]
    s_ref, s_low = stats.summary(same, 3), stats.summary(lower, 3)
    paired = stats.paired_margin(lower, same)
    assert s_low["tau"] < s_ref["tau"] - paired
    assert stats.independent_margin(s_low, s_ref) > paired


def test_acceptance_mismatches_count_prompts_and_tolerate_one_near_tie_in_eight():
    ref = [PC(16, 16, [9, 5, 2]), PC(13, 20, [10, 7, 3]), PC(10, 22, [9, 8, 5])] * 3 + [PC(6, 6, [4, 2, 0])]
    assert stats.acceptance_mismatches(ref, ref) == 0
    # The main job's drafter with its layer ids shifted by one: τ barely moves, counts move in 5 of 8.
    shifted = list(ref)
    shifted[0], shifted[2], shifted[5] = PC(15, 19, [9, 6, 4]), PC(11, 22, [9, 8, 5]), PC(9, 13, [8, 4, 1])
    assert stats.acceptance_mismatches(shifted, ref) == 3
    assert stats.allowed_mismatches(8) == 1 and stats.allowed_mismatches(10) == 1
    assert stats.allowed_mismatches(16) == 2 and stats.allowed_mismatches(3) == 1
    one_tie = list(ref)
    one_tie[1] = PC(13, 21, [10, 7, 4])
    assert stats.acceptance_mismatches(one_tie, ref) <= stats.allowed_mismatches(len(ref))
    assert stats.acceptance_mismatches(shifted, ref) > stats.allowed_mismatches(len(ref))


def test_serving_settings_and_serve_command():
    cfg = {
        "speculators_model_type": "dspark",
        "enable_confidence_head": True,
        "speculators_config": {"proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 7}]},
    }
    s = serving_settings(cfg, block_size=7)
    assert s["speculative_config"] == {"method": "dspark", "num_speculative_tokens": 7}
    assert s["draft_sample_method"] == {"greedy": "greedy", "sampling": "probabilistic"}
    assert s["enable_adaptive_verification"]["available"] is True
    line = serve_command("Qwen/Qwen3-8B", "me/drafter", s, sampling=True, adaptive=True)
    spec = json.loads(line.split("--speculative-config '")[1].rstrip("'"))
    assert spec == {
        "model": "me/drafter",
        "method": "dspark",
        "num_speculative_tokens": 7,
        "draft_sample_method": "probabilistic",
        "enable_adaptive_verification": True,
    }
    assert line.startswith("vllm serve Qwen/Qwen3-8B ")
    plain = serving_settings({"target_layer_ids": [1], "num_target_layers": 4}, block_size=5)
    assert plain["speculative_config"] == {"method": "dflash", "num_speculative_tokens": 5}
    assert plain["enable_adaptive_verification"]["available"] is False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


SPAWNER = """
import socket, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
print(child.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("how", ["error", "interrupt"])
def test_started_process_group_is_stopped_and_port_freed(tmp_path, how):
    from deepspec.engine.procs import free_port

    port = free_port()
    log = tmp_path / "p.log"
    env = {**os.environ}
    with pytest.raises(RuntimeError if how == "error" else KeyboardInterrupt):
        with started([sys.executable, "-c", SPAWNER, str(port)], env, log) as proc:
            deadline = time.time() + 30
            while time.time() < deadline and not log.read_text().strip():
                time.sleep(0.05)
            child = int(log.read_text().split()[0])
            assert port_in_use(port) and _alive(child)
            if how == "error":
                raise RuntimeError("caller failed")
            raise KeyboardInterrupt
    assert proc.poll() is not None
    deadline = time.time() + 10
    while time.time() < deadline and _alive(child):
        time.sleep(0.05)
    assert not _alive(child), "the engine's own helper processes must be stopped too"
    assert not port_in_use(port)


def test_stop_kills_a_process_that_ignores_sigterm(tmp_path):
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(600)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout.readline().strip() == b"up"
    t = time.time()
    stop(proc, grace_s=0.5)
    assert proc.returncode == -signal.SIGKILL and time.time() - t < 10


def test_failed_engine_run_names_the_error_and_the_log(tmp_path):
    log = tmp_path / "vllm.log"
    code = "import sys; print('loading...'); print('RuntimeError: Unsupported CPU attention', file=sys.stderr); sys.exit(3)"
    with pytest.raises(EngineError) as e:
        run_to_end([sys.executable, "-c", code], dict(os.environ), log, 60, "vLLM (T0)")
    msg = str(e.value)
    assert "\n" not in msg and "exit 3" in msg and "Unsupported CPU attention" in msg and str(log) in msg


def test_timeout_stops_the_engine(tmp_path):
    with pytest.raises(EngineError, match=r"did not finish within 1 s; read .*slow\.log"):
        run_to_end(
            [sys.executable, "-c", "import time; time.sleep(600)"],
            dict(os.environ),
            tmp_path / "slow.log",
            1,
            "vLLM",
        )


def test_missing_vllm_gives_one_line_with_the_install_command(tmp_path, monkeypatch):
    from deepspec.engine.check import run_engine_check

    monkeypatch.delenv("DEEPSPEC_VLLM_PYTHON", raising=False)
    monkeypatch.setenv("DEEPSPEC_VLLM_ENV", str(tmp_path / "no-env"))
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")
    with pytest.raises(EngineError) as e:
        run_engine_check(export, "unused-target", [[1, 2]], [0], setup=False)
    msg = str(e.value)
    assert "\n" not in msg and "scripts/make_vllm_env.sh" in msg and "DEEPSPEC_VLLM_PYTHON" in msg
    monkeypatch.setenv("DEEPSPEC_VLLM_PYTHON", str(tmp_path / "nope" / "python"))
    with pytest.raises(EngineError, match="does not exist"):
        run_engine_check(export, "unused-target", [[1, 2]], [0], setup=False)


# A stand-in for `python -m vllm.entrypoints.openai.api_server`: same flags, /health on --port, and a
# helper process of its own (vLLM starts an engine core); FAKE_VLLM picks how it behaves.
FAKE_SERVER = """
import http.server, os, subprocess, sys, time
port = int(sys.argv[sys.argv.index("--port") + 1])
mode = os.environ.get("FAKE_VLLM", "serve")
if mode == "crash":
    print("INFO loading model", flush=True)
    print("ValueError: head_size 16 is not supported by the CPU attention backend", flush=True)
    sys.exit(1)
if mode == "hang":
    time.sleep(600)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("helper", child.pid, flush=True)

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass

http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


def _fake_vllm_python(tmp_path):
    (tmp_path / "fake_server.py").write_text(FAKE_SERVER)
    python = tmp_path / "python"
    # Called as `python -m vllm.entrypoints.openai.api_server ARGS`: drop "-m MODULE", keep ARGS.
    python.write_text(f'#!/bin/sh\nshift 2\nexec {sys.executable} {tmp_path / "fake_server.py"} "$@"\n')
    python.chmod(0o755)
    return str(python)


def test_server_that_exits_before_serving_names_the_error_and_its_log(tmp_path, monkeypatch):
    from deepspec.engine.procs import free_port
    from deepspec.engine.server import vllm_server

    monkeypatch.setenv("FAKE_VLLM", "crash")
    log, port = tmp_path / "server.log", free_port()
    with pytest.raises(EngineError) as e:
        with vllm_server("tiny", log, vllm_python=_fake_vllm_python(tmp_path), port=port, timeout_s=60):
            pytest.fail("the server must not come up")
    msg = str(e.value)
    assert "\n" not in msg and "exited (code 1) before serving" in msg
    assert "head_size 16 is not supported" in msg and str(log) in msg
    assert not port_in_use(port)


def test_server_that_never_answers_is_stopped_and_names_its_log(tmp_path, monkeypatch):
    from deepspec.engine.procs import free_port
    from deepspec.engine.server import vllm_server

    monkeypatch.setenv("FAKE_VLLM", "hang")
    log, port = tmp_path / "server.log", free_port()
    t = time.time()
    with pytest.raises(EngineError, match=rf"did not answer .*:{port}/health within 2 s; read .*server\.log"):
        with vllm_server("tiny", log, vllm_python=_fake_vllm_python(tmp_path), port=port, timeout_s=2):
            pass
    assert time.time() - t < 30


@pytest.mark.parametrize("how", ["error", "interrupt"])
def test_server_is_stopped_by_pid_and_its_port_freed(tmp_path, monkeypatch, how):
    import urllib.request

    from deepspec.engine.server import vllm_server

    monkeypatch.setenv("FAKE_VLLM", "serve")
    log = tmp_path / "server.log"
    with pytest.raises(RuntimeError if how == "error" else KeyboardInterrupt):
        with vllm_server("tiny", log, vllm_python=_fake_vllm_python(tmp_path), timeout_s=60) as srv:
            with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/health", timeout=5) as r:
                assert r.status == 200
            helper = int(log.read_text().split("helper")[1].split()[0])
            pid, port = srv.pid, srv.port
            assert _alive(pid) and _alive(helper) and port_in_use(port)
            if how == "error":
                raise RuntimeError("regeneration failed")
            raise KeyboardInterrupt
    assert not _alive(pid) and not port_in_use(port)
    deadline = time.time() + 10
    while time.time() < deadline and _alive(helper):
        time.sleep(0.05)
    assert not _alive(helper), "the server's helper processes are stopped with it"


REPORT = {
    "ok": True,
    "prompts": 8,
    "max_new_tokens": 32,
    "runs": [
        {
            "temperature": 0.0,
            "draft_sample_method": "greedy",
            "identical_outputs": 8,
            "deepspec": {"tau": 2.049, "tau_ci95": [1.8, 2.3]},
            "vllm": {"tau": 2.049, "tau_ci95": [1.8, 2.3]},
            "margin95": 0.02,
            "ok": True,
        },
        {
            "temperature": 1.0,
            "draft_sample_method": "probabilistic",
            "identical_outputs": 1,
            "deepspec": {"tau": 1.95, "tau_ci95": [1.7, 2.2]},
            "vllm": {"tau": 1.9, "tau_ci95": [1.6, 2.2]},
            "margin95": 0.19,
            "ok": True,
        },
    ],
}


def test_card_has_exact_serve_commands_and_the_engine_check():
    from deepspec.exporting.card import serving_section, with_engine_check

    text = serving_section("speculators", "dspark", "Qwen/Qwen3-8B", "me/d", 7, True, engine_check=REPORT)
    greedy = '{"model": "me/d", "method": "dspark", "num_speculative_tokens": 7}'
    sampling = greedy[:-1] + ', "draft_sample_method": "probabilistic"}'
    assert f"vllm serve Qwen/Qwen3-8B --speculative-config '{greedy}'" in text
    assert f"vllm serve Qwen/Qwen3-8B --speculative-config '{sampling}'" in text
    assert '"enable_adaptive_verification": true' in text
    assert "| 0.0 | greedy | 2.049 [1.800, 2.300] | 2.049 [1.800, 2.300] | 0.020 | 8/8 | pass |" in text
    # At T>0 outputs differ by design (independent draws): no identical count, the interval is wider.
    assert "| 1.0 | probabilistic | 1.950 [1.700, 2.200] | 1.900 [1.600, 2.200] | 0.190 | – | pass |" in text
    # Rerunning the check replaces its section of an existing card instead of adding another.
    failed = {**REPORT, "ok": False}
    again = with_engine_check(text, failed)
    assert again.count("### Engine check") == 1 and "**FAIL**" in again and "**pass**" not in again
    fresh = with_engine_check("# card\n", REPORT)
    assert fresh.startswith("# card\n") and "**pass**" in fresh


def test_export_sidecar_records_the_serving_settings(tmp_path):
    from export_fixtures import tiny_drafter, tiny_target

    from deepspec.exporting.writer import export_drafter

    d = tiny_drafter(tiny_target())
    out = export_drafter(d, tmp_path / "spec", "speculators", dtype="float32")
    side = json.loads((out / "deepspec_export.json").read_text())
    assert side["serving"]["speculative_config"] == {"method": "dspark", "num_speculative_tokens": 4}
    assert side["serving"]["draft_sample_method"]["sampling"] == "probabilistic"
