"""The scheduler loop: messages, outputs, the watchdog, and crash reporting."""
import threading
import time
from types import SimpleNamespace

from engine.io_struct import SchedulerError
from engine.scheduler.event_loop import run_event_loop


class FakeScheduler:
    def __init__(self, step_seconds=0.0, fail=False):
        self.args = SimpleNamespace(watchdog_timeout=0.3)
        self.step_seconds, self.fail = step_seconds, fail
        self.handled, self.steps = [], 0

    def is_idle(self):
        return self.steps > 3

    def handle(self, msg):
        self.handled.append(msg)
        return f"reply-{msg}"

    def step(self):
        self.steps += 1
        if self.fail:
            raise RuntimeError("device lost")
        time.sleep(self.step_seconds)

    def take_outputs(self):
        return f"out-{self.steps}" if self.steps <= 2 else None


def run(sched, msgs, seconds):
    sent, stop = [], threading.Event()
    inbox = list(msgs)

    def recv(block):
        out, inbox[:] = list(inbox), []
        if block:
            time.sleep(0.01)
        return out

    def target():
        try:
            run_event_loop(sched, recv, sent.append, stop)
        except RuntimeError:
            pass  # re-raised after being reported; the report is what we check

    t = threading.Thread(target=target, daemon=True)
    t.start()
    time.sleep(seconds)
    stop.set()
    t.join(timeout=5)
    return sent


def test_messages_are_handled_and_outputs_sent():
    sched = FakeScheduler()
    sent = run(sched, ["a", "b"], 0.2)
    assert sched.handled == ["a", "b"]
    assert sent[:4] == ["reply-a", "reply-b", "out-1", "out-2"]


def test_watchdog_reports_a_stuck_step():
    sched = FakeScheduler(step_seconds=1.5)
    sent = run(sched, [], 1.6)
    errors = [m for m in sent if isinstance(m, SchedulerError)]
    assert errors and "watchdog-timeout" in errors[0].message


def test_a_crash_is_reported_to_the_front_end():
    sent = run(FakeScheduler(fail=True), [], 0.3)
    assert isinstance(sent[-1], SchedulerError) and "device lost" in sent[-1].message
