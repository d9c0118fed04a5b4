"""Look at a run in the MLflow UI as a user would: screenshots of its pages in headless Chromium.

Not a test (it needs a browser and takes minutes); run it after changing what the pipeline logs, and look
at the pictures. It runs a short quickstart (or takes an existing output_dir / tracking URI), starts the
UI with the command the run prints (`mlflow ui --host 127.0.0.1 --workers 1 ...`) on a free port, opens
the run in Chromium and saves a full-page PNG of each page: the experiment's run list, the run overview,
the model-metric charts, the system-metric charts, the artifacts (root and each plot) and the Logged
Model. The server is always stopped.

Needs the distribution's Chromium and Playwright for Python (no browser download, none is needed):

    apt-get install -y chromium
    pip install -e '.[ui]'
    python benchmarks/ui_check.py --out /tmp/ui_shots                  # a 60-step quickstart in a temp dir
    python benchmarks/ui_check.py --store runs/quickstart --out shots  # an existing run's output_dir
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# the quickstart, short: enough steps for curves with several points, evaluations on the way
QUICKSTART_OVERRIDES = ["train.max_steps=60", "train.eval_every=20", "train.log_every=5", "train.checkpoint_every=1000"]


@dataclass
class Target:
    """The run to look at, and what its pages are called in the UI."""

    experiment_id: str
    run_id: str
    run_name: str
    model_ids: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", help="an output_dir holding mlflow.db, or a tracking URI (default: run a short "
                                        "quickstart into a temporary folder)")
    parser.add_argument("--run-id", help="the run to open (default: the newest run of the store)")
    parser.add_argument("--out", type=Path, default=Path("ui_screenshots"), help="folder for the PNGs (default: %(default)s)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="more config overrides for the quickstart run (repeatable)")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="browser executable (default: %(default)s)")
    parser.add_argument("--width", type=int, default=1600, help="viewport width (default: %(default)s)")
    parser.add_argument("--height", type=int, default=1200, help="viewport height (default: %(default)s)")
    parser.add_argument("--server-timeout", type=float, default=180.0,
                        help="seconds to wait for the UI to answer (default: %(default)s)")
    return parser.parse_args(argv)


def tracking_uri(store: str) -> str:
    """A folder is an output_dir (its mlflow.db); anything else is taken as a tracking URI."""
    path = Path(store)
    if path.is_dir():
        return f"sqlite:///{(path / 'mlflow.db').resolve()}"
    return store


def run_quickstart(output_dir: Path, overrides: list[str]) -> None:
    """The README's quickstart in one process, short; its log goes next to the run."""
    command = [sys.executable, "-m", "launch.cli", "run", "configs/quickstart.yaml", f"output_dir={output_dir}",
               *QUICKSTART_OVERRIDES, *overrides]
    print("running:", " ".join(command[1:]), flush=True)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    log = Path(f"{output_dir}.log")
    with log.open("w") as sink:
        subprocess.run(command, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, check=True,
                       env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    print(*log.read_text().splitlines()[-4:], sep="\n", flush=True)  # what the run tells its user: results, the UI


def find_target(uri: str, run_id: str | None) -> Target:
    """The run (given, or the newest of any experiment), its Logged Models and the PNGs among its artifacts."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if run_id is None:
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(experiments, order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            raise SystemExit(f"no run in {uri}")
        run_id = runs[0].info.run_id
    run = client.get_run(run_id)
    experiment_id = run.info.experiment_id
    models = client.search_logged_models(experiment_ids=[experiment_id])
    return Target(experiment_id, run_id, run.info.run_name,
                  [m.model_id for m in models if m.source_run_id == run_id], images(client, run_id))


def images(client, run_id: str, path: str | None = None) -> list[str]:
    """The PNGs among the run's artifacts, in folders too (a model folder holds none worth a look)."""
    found = []
    for entry in client.list_artifacts(run_id, path):
        if entry.is_dir and Path(entry.path).name not in ("model", "scores"):
            found += images(client, run_id, entry.path)
        elif entry.path.endswith(".png"):
            found.append(entry.path)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_ui(uri: str, timeout: float) -> Iterator[str]:
    """The UI as the run prints it (one worker, 127.0.0.1), until it answers /health; stopped on the way out."""
    port = free_port()
    command = ["mlflow", "ui", "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--backend-store-uri", uri]
    log = tempfile.NamedTemporaryFile("w+", prefix="mlflow_ui_", suffix=".log", delete=False)
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        started = time.monotonic()
        wait_until_answers(f"{base}/health", server, timeout, Path(log.name))
        print(f"mlflow ui answered after {time.monotonic() - started:.1f} s at {base}", flush=True)
        yield base
    finally:
        stop(server)
        log.close()


def wait_until_answers(url: str, server: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"mlflow ui exited ({server.returncode}):\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.5)
    raise SystemExit(f"mlflow ui did not answer {url} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop(server: subprocess.Popen) -> None:
    """SIGTERM the server's process group (uvicorn and its worker), SIGKILL if it lingers."""
    if server.poll() is not None:
        return
    os.killpg(server.pid, 15)
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, 9)
        server.wait()


def pages(target: Target) -> list[tuple[str, str, str | None]]:
    """(file name, URL fragment, artifact to click open or None) of every page to photograph, in the UI's
    model-training view as the run's printed address opens it (without it the UI starts in its GenAI view)."""
    experiment, view = f"#/experiments/{target.experiment_id}", "?workflowType=machine_learning"
    run = f"{experiment}/runs/{target.run_id}"
    shots = [("experiment_runs", f"{experiment}/runs{view}", None), ("run_overview", f"{run}{view}", None),
             ("model_metrics", f"{run}/model-metrics{view}", None), ("system_metrics", f"{run}/system-metrics{view}", None),
             ("artifacts", f"{run}/artifacts{view}", None)]
    shots += [(f"artifact_{Path(p).stem}", f"{run}/artifacts{view}", p) for p in target.plots]
    shots += [(f"logged_model_{i}" if i else "logged_model", f"{experiment}/models/{m}{view}", None)
              for i, m in enumerate(target.model_ids)]
    return shots


def open_artifact(page, path: str) -> None:
    """Click through the artifact tree (folders, then the file): a URL with the path does not select it."""
    for part in Path(path).parts:
        page.get_by_text(part, exact=True).first.click()
        page.wait_for_timeout(500)


SPINNERS = '[role="progressbar"], [class*="spinner" i], [class*="skeleton" i], [data-testid*="spinner" i]'
# the panes the UI scrolls inside (the window itself does not scroll), tallest first
SCROLL_PANES = """() => [...document.querySelectorAll('*')]
    .filter(e => e.scrollHeight > e.clientHeight + 20 && ['auto', 'scroll'].includes(getComputedStyle(e).overflowY))
    .map(e => e.scrollHeight - e.clientHeight).sort((a, b) => b - a)"""


def settle(page, timeout_ms: int = 120_000) -> None:
    """Wait until nothing loads: no request in flight, no spinner or skeleton (a chart still drawing)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_load_state("networkidle", timeout=timeout_ms // 4)
    except PlaywrightTimeout:  # the UI polls (auto-refresh): an idle network is a hint, the spinners decide
        pass
    page.wait_for_function(f"() => !document.querySelector('{SPINNERS}')", timeout=timeout_ms)
    page.wait_for_timeout(1500)  # the last chart's transition


def unfold(page, width: int, height: int, max_height: int = 7000) -> None:
    """Make the viewport as tall as the page's content: charts below the fold render only once on screen,
    and a full-page screenshot does not see inside a scrolled pane."""
    hidden = page.evaluate(SCROLL_PANES)
    if hidden:
        page.set_viewport_size({"width": width, "height": min(max_height, height + hidden[0])})
        settle(page)


def close_assistant(page) -> None:
    """The MLflow Assistant panel opens on its own and covers a third of the page; a user closes it."""
    button = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
    if button.count():
        button.first.click()
        page.wait_for_timeout(500)


def photograph(base: str, target: Target, out: Path, chromium: str, viewport: tuple[int, int]) -> list[Path]:
    """One PNG per page; a page that does not settle is still saved (its name says so) so it can be looked at."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    saved = []
    with tempfile.TemporaryDirectory(prefix="ui_check_profile_") as profile, sync_playwright() as p:
        context = p.chromium.launch_persistent_context(profile, executable_path=chromium, args=CHROMIUM_ARGS,
                                                       headless=True, viewport={"width": viewport[0], "height": viewport[1]})
        try:
            page = context.new_page()
            for name, fragment, artifact in pages(target):
                page.set_viewport_size({"width": viewport[0], "height": viewport[1]})
                page.goto(f"{base}/{fragment}")
                try:
                    settle(page)
                    close_assistant(page)
                    if artifact:
                        open_artifact(page, artifact)
                        settle(page)
                    unfold(page, *viewport)
                except PlaywrightTimeout:
                    name += "_unsettled"
                path = out / f"{name}.png"
                page.screenshot(path=path, full_page=True)
                saved.append(path)
                print(f"saved {path}", flush=True)
        finally:
            context.close()
    return saved


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ui_check_run_") as tmp:
        store = args.store
        if store is None:
            store = str(Path(tmp) / "quickstart")
            run_quickstart(Path(store), args.override)
        uri = tracking_uri(store)
        target = find_target(uri, args.run_id)
        print(f"run {target.run_name!r} ({target.run_id}), experiment {target.experiment_id}, "
              f"logged models {target.model_ids}", flush=True)
        with mlflow_ui(uri, args.server_timeout) as base:
            photograph(base, target, args.out, args.chromium, (args.width, args.height))


if __name__ == "__main__":
    main()
