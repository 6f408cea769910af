"""The `tandem` command line as a user runs it: `tandem serve --port 0` in a subprocess, client commands
in subprocesses against it, and SIGTERM for a graceful exit."""

from __future__ import annotations

import json
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cli.chat import HUMAN, build_prompt
from clients.client import TandemClient

pytestmark = pytest.mark.slow


def tandem_command() -> list[str]:
    script = Path(sys.executable).parent / "tandem"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli.main"]


def tandem(*args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*tandem_command(), *args], input=stdin, capture_output=True, text=True, timeout=timeout)


class ServeProcess:
    """`tandem serve --port 0` in a subprocess; the address is parsed from the line it prints."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([*tandem_command(), "serve", "--port", "0", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stdout], daemon=True).start()
        self.stderr: list[str] = []
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()
        try:
            line = lines.get(timeout=120)
        except queue.Empty:
            self.proc.kill()
            raise AssertionError(f"tandem serve printed nothing: {''.join(self.stderr)}") from None
        match = re.fullmatch(r"serving (.+) on (127\.0\.0\.1:\d+)\n", line)
        assert match, line
        self.model, self.address = match.groups()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def served(tinystories_path):
    server = ServeProcess("--model", str(tinystories_path), "--device", "cpu", "--kv-blocks", "256", "--grace-period", "20")
    yield server
    server.close()


def test_complete_prints_the_greedy_completion(served):
    with TandemClient(served.address, timeout=60) as client:
        client.wait_ready(30)
        [expected] = client.generate("Once upon a time", temperature=0, max_new_tokens=24)
    done = tandem("complete", "--server", served.address, "--max-new-tokens", "24", "Once upon a time")
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected.text + "\n"
    streamed = tandem("complete", "--server", served.address, "--max-new-tokens", "24", "--stream",
                      "Once upon a time")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == expected.text + "\n"


def test_complete_reports_bad_values_from_the_server(served):
    done = tandem("complete", "--server", served.address, "--top-p", "1.5", "Once upon a time")
    assert done.returncode == 1 and "params.top_p" in done.stderr and served.address in done.stderr
    assert "Traceback" not in done.stderr


def test_status_readable_and_json(served):
    text = tandem("status", "--server", served.address)
    assert text.returncode == 0, text.stderr
    assert "SERVING" in text.stdout and served.model in text.stdout and "blocks free" in text.stdout
    as_json = tandem("status", "--server", served.address, "--json")
    fields = json.loads(as_json.stdout)
    assert fields["health"] == "SERVING" and fields["model"] == served.model
    assert fields["kv_blocks_total"] == 256 and fields["max_model_len"] == 512 and fields["tensor_parallel"] == 1


def test_chat_two_turns_then_eof(served):
    first, second = "Tell me a story about a cat.", "What did the cat eat?"
    done = tandem("chat", "--server", served.address, "--temperature", "0", "--max-new-tokens", "24",
                  stdin=f"{first}\n{second}\n")
    assert done.returncode == 0, done.stderr
    # The same two turns through the library: the chat must keep the first turn in the second prompt.
    with TandemClient(served.address, timeout=60) as client:
        reply1 = client.generate(build_prompt("", [], first), temperature=0, max_new_tokens=24, stop=[HUMAN])[0].text
        reply2 = client.generate(build_prompt("", [(first, reply1.strip())], second), temperature=0,
                                 max_new_tokens=24, stop=[HUMAN])[0].text
    assert reply1.strip() and reply2.strip() and reply1 != reply2
    assert done.stdout == f"Assistant: {reply1.lstrip()}\nAssistant: {reply2.lstrip()}\n"


def test_client_commands_name_an_unreachable_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{s.getsockname()[1]}"
    for args in (["status"], ["complete", "hello"]):
        done = tandem(*args, "--server", target)
        assert done.returncode == 1 and target in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


@pytest.mark.parametrize("args, option", [
    (["--token-budget", "0"], "--token-budget"),
    (["--block-size", "0"], "--block-size"),
    (["--max-num-seqs", "0"], "--max-num-seqs"),
    (["--kv-blocks", "-1"], "--kv-blocks"),
    (["--port", "70000"], "--port"),
    (["--dtype", "float64"], "--dtype"),
    (["--tp", "0"], "--tp"),
])
def test_serve_rejects_bad_options_naming_them(tinystories_path, args, option):
    done = tandem("serve", "--model", str(tinystories_path), *args)
    assert done.returncode == 2 and option in done.stderr and "Traceback" not in done.stderr


def test_serve_rejects_a_missing_model_folder(tmp_path):
    done = tandem("serve", "--model", str(tmp_path / "nope"))
    assert done.returncode == 2 and "--model" in done.stderr and "no such folder" in done.stderr


def test_chat_drops_the_oldest_turns_when_the_context_is_full(served, capsys):
    from cli.chat import _reply

    turns = [("long " * 600, "ok"), ("short", "fine")]
    with TandemClient(served.address, timeout=60) as client:
        reply = _reply(client, "", turns, "And then?", {"temperature": 0, "max_new_tokens": 8, "stop": [HUMAN]})
    assert turns == [("short", "fine")]
    assert capsys.readouterr().out == f"Assistant: {reply}\n"


def test_sigterm_finishes_in_flight_streams_then_exits_0(served):
    """Last in this module: it shuts the module's server down."""
    with TandemClient(served.address, timeout=60) as client:
        stream = client.generate_stream("Once upon a time", max_new_tokens=200, ignore_eos=True)
        first = next(stream)
        served.proc.send_signal(signal.SIGTERM)
        rest = list(stream)
    assert len(first.token_ids) + sum(len(d.token_ids) for d in rest) == 200
    assert rest[-1].finish_reason == "length"
    assert served.proc.wait(timeout=30) == 0, "".join(served.stderr)
    assert "shutting down" in "".join(served.stderr)


def test_progress_is_one_plain_line_per_interval_when_piped():
    """Off a terminal (a `tandem up > log`), progress writes whole lines and no carriage returns."""
    import io

    from common.progress import progress

    log = io.StringIO()
    bar = progress(range(1000), desc="piped", file=log)
    for i in bar:
        bar.set_postfix(step=i)                # as the training loops do, every step: no extra line
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert len(lines) <= 3 and lines[-1].startswith("piped: 100%") and "1000/1000" in lines[-1]
