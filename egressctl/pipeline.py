"""The event pipeline on the local stack: what Pub/Sub, Cloud Functions, Cloud Scheduler and a
Deployment controller do in Google Cloud, done with local processes.

- Pub/Sub: the dev stack's emulator; topics and *push* subscriptions to the locally served
  functions (functions-framework turns the raw push body into a CloudEvent), with ordering and
  a dead-letter topic as deployed (cloudbuild.yaml's subscriptions step).
- Functions: one functions-framework server per entry point of ``main.py``, each its own process
  (so a test can kill one mid-reconcile), as the reconciler's RBAC identity. ``on_sweep`` also
  publishes to the emulator: a large sweep's coordinator publishes its shard messages on the
  sweep topic. (The emulator pushes at most two messages of one subscription at a time: its
  jar starts two push loops per subscription; Pub/Sub has no such limit.)
- Exporter: ``python -m exporter`` as the exporter's RBAC identity, restarted with backoff when
  it exits (as its Deployment would be).
- Scheduler: a thread publishing to the sweep topic on a short interval.
- A supervisor re-creates topics and subscriptions if the emulator lost them (it keeps nothing
  across a restart) and restarts exited processes.

Used by ``egressctl run`` (``make run``), the end-to-end tests and the benchmarks, so all three
exercise the same wiring.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.notice import DEFAULT_EVENTS_TOPIC, DEFAULT_SWEEP_TOPIC
from egressctl.devstack.procs import ProcRecord, is_running, spawn, stop, wait_for

EVENT_FUNCTION = "on_event"
SWEEP_FUNCTION = "on_sweep"
REPAIR_FUNCTION = "repair"
FUNCTIONS: dict[str, str] = {
    EVENT_FUNCTION: "cloudevent",
    SWEEP_FUNCTION: "cloudevent",
    REPAIR_FUNCTION: "http",
}
DEAD_LETTER_TOPIC = "egress-events-dead"
EVENTS_SUBSCRIPTION = "egress-events-push"
SWEEP_SUBSCRIPTION = "egress-sweep-push"
DEAD_LETTER_SUBSCRIPTION = "egress-events-dead-pull"
STATE_FILE = "pipeline.json"
SWEEP_ACK_DEADLINE_S = 600
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PipelineConfig:
    dev_env: Mapping[str, str]  # the dev stack's env file values
    state_dir: Path  # where logs and pipeline.json go (the dev stack's directory)
    delete_grace_s: int = 5
    sweep_interval_s: float | None = 30.0  # None: no scheduler (tests trigger sweeps)
    extra_env: dict[str, str] = field(default_factory=dict)
    exporter_watch_timeout_s: int = 60
    say: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)


class LocalPipeline:
    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        env = config.dev_env
        self.project = env["PUBSUB_PROJECT_ID"]
        self.pubsub_host = env["PUBSUB_EMULATOR_HOST"]
        self.ports = {name: free_port() for name in FUNCTIONS}
        self.exporter_health_port = free_port()
        self.procs: dict[str, ProcRecord] = {}
        self.function_env: dict[str, dict[str, str]] = {}
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.restarts: dict[str, int] = {}
        self.sweeps_published = 0
        self._lock = threading.RLock()
        self._publisher: Any = None
        self.logs = config.state_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    # -- addresses ---------------------------------------------------------------------------

    def url(self, function: str) -> str:
        return f"http://127.0.0.1:{self.ports[function]}/"

    def log_path(self, name: str) -> Path:
        return self.logs / f"pipeline-{name}.log"

    def topic(self, name: str) -> str:
        return f"projects/{self.project}/topics/{name}"

    def subscription(self, name: str) -> str:
        return f"projects/{self.project}/subscriptions/{name}"

    # -- environment -----------------------------------------------------------------------

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBECONFIG")}
        env.update(self.config.dev_env)
        env.update(
            {
                "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": str(REPO),
                "EGRESS_EVENTS_TOPIC": DEFAULT_EVENTS_TOPIC,
                "EGRESS_SWEEP_TOPIC": DEFAULT_SWEEP_TOPIC,
                "GOOGLE_CLOUD_PROJECT": self.project,
            }
        )
        if "DELETE_GRACE_SECONDS" not in os.environ:
            env["DELETE_GRACE_SECONDS"] = str(self.config.delete_grace_s)
        env.update(self.config.extra_env)
        return env

    def functions_env(self, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
        env = self.base_env()
        env.pop("PUBSUB_EMULATOR_HOST", None)  # only on_sweep publishes (start_function)
        env["KUBECONFIG"] = self.config.dev_env["KUBECONFIG_RECONCILER"]
        env["KUBE_CREDENTIALS"] = "kubeconfig"
        env.update(overrides or {})
        return env

    def exporter_env(self) -> dict[str, str]:
        env = self.base_env()
        env["KUBECONFIG"] = self.config.dev_env["KUBECONFIG_EXPORTER"]
        env["EXPORTER_HEALTH_HOST"] = "127.0.0.1"
        env["EXPORTER_HEALTH_PORT"] = str(self.exporter_health_port)
        env["EXPORTER_WATCH_TIMEOUT_SECONDS"] = str(self.config.exporter_watch_timeout_s)
        env.setdefault("EXPORTER_PUBLISH_TIMEOUT_SECONDS", "10")
        return env

    # -- Pub/Sub ---------------------------------------------------------------------------

    def _clients(self) -> tuple[Any, Any]:
        os.environ["PUBSUB_EMULATOR_HOST"] = self.pubsub_host
        from google.cloud import pubsub_v1

        return pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()

    def ensure_pubsub(self) -> bool:
        """Create topics and subscriptions that are missing; True if anything was created."""
        from google.api_core import exceptions as gexc

        publisher, subscriber = self._clients()
        created = False
        try:
            for topic in (DEFAULT_EVENTS_TOPIC, DEFAULT_SWEEP_TOPIC, DEAD_LETTER_TOPIC):
                with contextlib.suppress(gexc.AlreadyExists):
                    publisher.create_topic(name=self.topic(topic))
                    created = True
            subs: list[dict[str, Any]] = [
                {
                    "name": self.subscription(EVENTS_SUBSCRIPTION),
                    "topic": self.topic(DEFAULT_EVENTS_TOPIC),
                    "push_config": {"push_endpoint": self.url(EVENT_FUNCTION)},
                    "ack_deadline_seconds": 60,
                    "enable_message_ordering": True,
                    "retry_policy": {
                        "minimum_backoff": {"seconds": 1},
                        "maximum_backoff": {"seconds": 10},
                    },
                    "dead_letter_policy": {
                        "dead_letter_topic": self.topic(DEAD_LETTER_TOPIC),
                        "max_delivery_attempts": 100,
                    },
                },
                {
                    "name": self.subscription(SWEEP_SUBSCRIPTION),
                    "topic": self.topic(DEFAULT_SWEEP_TOPIC),
                    "push_config": {"push_endpoint": self.url(SWEEP_FUNCTION)},
                    # Pub/Sub's maximum: a sweep (or one of its shards) runs up to the
                    # function's 540 s timeout, and is redelivered if not answered by then.
                    "ack_deadline_seconds": SWEEP_ACK_DEADLINE_S,
                },
                {
                    "name": self.subscription(DEAD_LETTER_SUBSCRIPTION),
                    "topic": self.topic(DEAD_LETTER_TOPIC),
                },
            ]
            for request in subs:
                try:
                    existing = subscriber.get_subscription(subscription=request["name"])
                except gexc.NotFound:
                    subscriber.create_subscription(request=request)
                    created = True
                    continue
                deadline = request.get("ack_deadline_seconds")
                if deadline and existing.ack_deadline_seconds != deadline:
                    # A subscription left by an earlier version of this wiring.
                    subscriber.update_subscription(
                        request={
                            "subscription": {
                                "name": request["name"],
                                "ack_deadline_seconds": deadline,
                            },
                            "update_mask": {"paths": ["ack_deadline_seconds"]},
                        }
                    )
                endpoint = request.get("push_config", {}).get("push_endpoint", "")
                if existing.push_config.push_endpoint != endpoint:
                    # A subscription left by an earlier run points at old ports.
                    subscriber.modify_push_config(
                        request={
                            "subscription": request["name"],
                            "push_config": {"push_endpoint": endpoint},
                        }
                    )
        finally:
            subscriber.close()
            publisher.transport.close()
        return created

    def detach_push(self) -> None:
        """Turn the push subscriptions into pull ones while no function listens.

        Otherwise the emulator keeps pushing undelivered notices to the stopped functions
        until they dead-letter, and the emulator's dead-letter path then kills its push
        threads (a NullPointerException in its PushLoop): every later run would get no
        pushes. The notices stay queued; the next start points the subscriptions at the
        functions again (``ensure_pubsub``) and they are delivered then."""
        publisher, subscriber = self._clients()
        try:
            for name in (EVENTS_SUBSCRIPTION, SWEEP_SUBSCRIPTION):
                subscriber.modify_push_config(
                    request={"subscription": self.subscription(name), "push_config": {}}
                )
        finally:
            subscriber.close()
            publisher.transport.close()

    def publish(self, topic: str, data: bytes, ordering_key: str = "", **attributes: str) -> str:
        with self._lock:
            if self._publisher is None:
                os.environ["PUBSUB_EMULATOR_HOST"] = self.pubsub_host
                from google.cloud import pubsub_v1

                self._publisher = pubsub_v1.PublisherClient(
                    publisher_options=pubsub_v1.types.PublisherOptions(enable_message_ordering=True)
                )
            publisher = self._publisher
        future = publisher.publish(self.topic(topic), data, ordering_key=ordering_key, **attributes)
        if ordering_key:
            try:
                return str(future.result(timeout=30))
            except Exception:
                publisher.resume_publish(self.topic(topic), ordering_key)
                raise
        return str(future.result(timeout=30))

    def trigger_sweep(self) -> str:
        """What Cloud Scheduler's Pub/Sub target does: publish its (unused) body."""
        message_id = self.publish(DEFAULT_SWEEP_TOPIC, b'{"trigger":"scheduler"}')
        self.sweeps_published += 1
        return message_id

    # -- processes -------------------------------------------------------------------------

    def start_function(self, function: str, overrides: Mapping[str, str] | None = None) -> None:
        env = self.functions_env(overrides)
        if function == SWEEP_FUNCTION:
            env["PUBSUB_EMULATOR_HOST"] = self.pubsub_host  # shard messages
        self.function_env[function] = env
        argv = [
            sys.executable,
            "-m",
            "functions_framework",
            f"--target={function}",
            f"--signature-type={FUNCTIONS[function]}",
            f"--source={REPO / 'main.py'}",
            "--host=127.0.0.1",
            f"--port={self.ports[function]}",
        ]
        with self._lock:
            self.procs[function] = spawn(function, argv, self.log_path(function), env=env, cwd=REPO)
        if not wait_for(lambda: self._http_up(self.url(function)), 30):
            raise RuntimeError(f"function {function} did not start; see {self.log_path(function)}")

    def kill_function(self, function: str) -> None:
        """SIGKILL, as an instance dying mid-request would (no graceful shutdown)."""
        import signal

        with self._lock:
            rec = self.procs.pop(function)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(rec.pid, signal.SIGKILL)
        wait_for(lambda: not is_running(rec), 10)

    def start_exporter(self) -> None:
        argv = [sys.executable, "-m", "exporter"]
        with self._lock:
            self.procs["exporter"] = spawn(
                "exporter", argv, self.log_path("exporter"), env=self.exporter_env(), cwd=REPO
            )

    def stop_process(self, name: str) -> None:
        with self._lock:
            rec = self.procs.pop(name, None)
        if rec is not None:
            stop(rec)

    def exporter_ready(self) -> bool:
        return self._http_up(f"http://127.0.0.1:{self.exporter_health_port}/readyz", status=200)

    def exporter_health(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.exporter_health_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                result: dict[str, Any] = json.loads(resp.read())
                return result
        except urllib.error.HTTPError as exc:
            result = json.loads(exc.read())
            return result
        except OSError:
            return {}

    @staticmethod
    def _http_up(url: str, status: int | None = None) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return status is None or resp.status == status
        except urllib.error.HTTPError as exc:
            return status is None or exc.code == status
        except OSError:
            return False

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self.ensure_pubsub()
        for function in FUNCTIONS:
            self.start_function(function)
        self.start_exporter()
        if not wait_for(self.exporter_ready, 60):
            raise RuntimeError(f"exporter not ready; see {self.log_path('exporter')}")
        self.write_state()
        self._thread(self._supervise, "supervisor")
        if self.config.sweep_interval_s:
            self._thread(self._schedule, "scheduler")

    def _thread(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def write_state(self) -> None:
        state = {
            "functions": {name: self.url(name) for name in FUNCTIONS},
            "exporterHealth": f"http://127.0.0.1:{self.exporter_health_port}/healthz",
            "logs": {name: str(self.log_path(name)) for name in [*FUNCTIONS, "exporter"]},
            "pid": os.getpid(),
        }
        (self.config.state_dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=5)
        for name in ["exporter", *FUNCTIONS]:
            self.stop_process(name)
        with contextlib.suppress(Exception):
            self.detach_push()
        with contextlib.suppress(FileNotFoundError):
            (self.config.state_dir / STATE_FILE).unlink()
        if self._publisher is not None:
            with contextlib.suppress(Exception):
                self._publisher.stop()

    def _supervise(self) -> None:
        """Restart what exited; re-create Pub/Sub resources an emulator restart lost."""
        backoff: dict[str, float] = {}
        next_try: dict[str, float] = {}
        while not self.stopping.wait(1.0):
            with contextlib.suppress(Exception):
                if self.ensure_pubsub():
                    # Notices published between the topic's and the subscription's re-creation
                    # reached no subscriber: a re-list (exporter restart) and a sweep recover
                    # them, as an operator would after re-creating lost Pub/Sub resources.
                    self.config.say(
                        "[pipeline] re-created Pub/Sub topics and subscriptions; restarting the "
                        "exporter (re-list) and sweeping"
                    )
                    self.stop_process("exporter")
                    self.start_exporter()
                    self.trigger_sweep()
            with self._lock:
                dead = [name for name, rec in self.procs.items() if not is_running(rec)]
            for name in dead:
                now = time.monotonic()
                if now < next_try.get(name, 0.0):
                    continue
                delay = min(30.0, backoff.get(name, 0.5) * 2)
                backoff[name] = delay
                next_try[name] = now + delay
                self.restarts[name] = self.restarts.get(name, 0) + 1
                self.config.say(f"[pipeline] {name} exited; restarting (backoff {delay:.0f}s)")
                try:
                    if name == "exporter":
                        self.start_exporter()
                    else:
                        self.start_function(name, self._overrides(name))
                except Exception as exc:
                    self.config.say(f"[pipeline] restarting {name} failed: {exc}")

    def _overrides(self, function: str) -> dict[str, str]:
        env = self.function_env.get(function) or {}
        base = self.functions_env()
        return {k: v for k, v in env.items() if base.get(k) != v}

    def _schedule(self) -> None:
        interval = float(self.config.sweep_interval_s or 0)
        while not self.stopping.wait(interval):
            with contextlib.suppress(Exception):
                self.trigger_sweep()


def read_state(state_dir: Path) -> dict[str, Any] | None:
    try:
        result: dict[str, Any] = json.loads((state_dir / STATE_FILE).read_text())
        return result
    except (FileNotFoundError, ValueError):
        return None
