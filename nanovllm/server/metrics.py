"""Prometheus metrics for GET /metrics, in the text exposition format (written by hand: it is small).

Gauges and token counters come from the engine's stats snapshot; latency histograms are observed by
the server as outputs reach the request handlers (so they include the HTTP side's queueing). A beam
search counts as the request the client sent, one finished request per choice as an ordinary request
with n choices counts: the server observes it when the search ends (`observe_search_choice`), and its
one-token steps count nowhere (vLLM's server counts each step's requests instead).
"""

from __future__ import annotations

import bisect
from collections import Counter

PREFIX = "nanovllm:"
TTFT_BUCKETS_S = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
TPOT_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
)
E2E_BUCKETS_S = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
)


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = PREFIX + name, help, buckets
        self.counts = [0] * (len(buckets) + 1)  # last: above the largest bucket
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self, labels: str) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, n in zip((*self.buckets, "+Inf"), self.counts):
            cumulative += n
            lines.append(f'{self.name}_bucket{{{labels},le="{bound}"}} {cumulative}')
        lines.append(f"{self.name}_sum{{{labels}}} {self.sum}")
        lines.append(f"{self.name}_count{{{labels}}} {self.count}")
        return lines


class Metrics:
    """Server-side observations; `render(stats)` adds the engine's snapshot. Event-loop thread only."""

    def __init__(self, model_name: str):
        self.labels = f'model_name="{_escape(model_name)}"'
        # The engine reports tokens as they come only for streamed requests: TTFT and TPOT cover those.
        self.ttft = Histogram(
            "time_to_first_token_seconds", "Time to first token (streamed requests).", TTFT_BUCKETS_S
        )
        self.tpot = Histogram(
            "time_per_output_token_seconds",
            "Mean time per output token after the first (streamed requests).",
            TPOT_BUCKETS_S,
        )
        self.e2e = Histogram("e2e_request_latency_seconds", "End-to-end request latency.", E2E_BUCKETS_S)
        self.finished = Counter()  # finish reason -> number of (sub-)requests
        # Tokens of the beam searches' choices (the engine does not count their steps' requests)
        self.num_prompt_tokens = 0
        self.num_generated_tokens = 0

    def observe_finished(
        self, reason: str | None, e2e_s: float, decode_s: float | None, num_tokens: int
    ) -> None:
        """decode_s: first token to last; None when unknown (a non-streamed request)."""
        self.finished[reason or "unknown"] += 1
        self.e2e.observe(e2e_s)
        if decode_s is not None and num_tokens > 1:
            self.tpot.observe(decode_s / (num_tokens - 1))

    def observe_search_choice(
        self, reason: str | None, e2e_s: float, num_prompt_tokens: int, num_generated_tokens: int
    ) -> None:
        """A beam search's choice, as a finished non-streamed request with its prompt and tokens (a
        final EOS counted, as the engine counts it)."""
        self.observe_finished(reason, e2e_s, None, num_generated_tokens)
        self.num_prompt_tokens += num_prompt_tokens
        self.num_generated_tokens += num_generated_tokens

    def observe_aborted(self) -> None:
        self.finished["abort"] += 1

    def render(self, stats: dict[str, float]) -> str:
        lines: list[str] = []

        def sample(name: str, kind: str, help: str, value: float) -> None:
            name = PREFIX + name
            lines.extend(
                [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name}{{{self.labels}}} {value}"]
            )

        g = lambda key: stats.get(key, 0)  # noqa: E731
        sample("num_requests_running", "gauge", "Requests in the running batch.", g("num_running"))
        sample("num_requests_waiting", "gauge", "Requests waiting to be scheduled.", g("num_waiting"))
        sample(
            "kv_cache_usage_perc",
            "gauge",
            "Fraction of KV-cache blocks in use (1 = full).",
            g("kv_cache_usage"),
        )
        sample("num_kv_blocks", "gauge", "KV-cache blocks in total.", g("num_kv_blocks"))
        sample(
            "prefix_cache_hit_rate",
            "gauge",
            "Prompt tokens served from the prefix cache / queried.",
            g("prefix_cache_hit_rate"),
        )
        sample(
            "num_preemptions_total", "counter", "Requests preempted (recomputed later).", g("num_preemptions")
        )
        num_prompt_tokens = g("num_prompt_tokens") + self.num_prompt_tokens
        num_generated_tokens = g("num_generated_tokens") + self.num_generated_tokens
        sample("prompt_tokens_total", "counter", "Prompt tokens received.", num_prompt_tokens)
        sample("generation_tokens_total", "counter", "Tokens generated.", num_generated_tokens)
        name = PREFIX + "request_success_total"
        lines.extend([f"# HELP {name} Finished requests by finish reason.", f"# TYPE {name} counter"])
        for reason in sorted({"stop", "length", "abort", *self.finished}):
            lines.append(
                f'{name}{{{self.labels},finished_reason="{_escape(reason)}"}} {self.finished[reason]}'
            )
        for hist in (self.ttft, self.tpot, self.e2e):
            lines.extend(hist.render(self.labels))
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
