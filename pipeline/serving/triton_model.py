"""Triton Python-backend model that serves a Kiln engine (copied into the repository as `model.py`).

Runs in the serving environment (numpy < 2, onnxruntime, tokenizers; no Kiln, no torch). Decoupled:
every request gets its responses through its own sender, one per text delta when `stream` is true,
else one with the whole text.

In-flight batching (`kiln_engine.Scheduler`): one worker thread runs the scheduler's steps; a
request that arrives takes a free row at the next step (its prompt prefilled in chunks shared with
the running rows' decode steps, a cached prefix reused), and a finished, stopped or cancelled request
leaves the step it ends, its row and its KV memory freed. At most `max_batch` rows run; up to
`max_queue` more wait, and a request beyond that is refused at once with "server busy" unless a
waiting request of a lower priority class gives up its place to it (the optional `priority` and
`tenant` inputs, which the OpenAI gateway sets from the caller's API key; `kiln_engine.WaitingRoom`:
higher classes get rows first, tenants of a class take turns). A request
whose client has gone (gRPC stream cancelled or closed) stops within one step. When `kiln serve`
stops (it creates the file `$KILN_DRAIN_FILE` before it sends tritonserver SIGTERM) or the model is
unloaded, every request still running or waiting gets its final response within one step
(finish_reason "cancelled") and new ones are refused ("server shutting down"), so tritonserver
finds nothing in flight and unloads the model gracefully instead of waiting out its exit timeout.

Metrics on Triton's metrics port (Python backend custom metrics), labelled with the model name and
version (the registry version when `kiln serve` serves a registered one): time to first token,
time per output token (a request's mean), queue wait, generated tokens per request (histograms), running rows (gauge),
cancelled requests, prompt tokens and prompt tokens served from the prefix cache (counters: their
ratio is the hit rate), speculative verifications and drafted and accepted tokens (counters), and for autoscaling the requests waiting for a row, the share of rows in
use, and requests refused as busy by priority class.

Before loading, every file of this model version is checked against `manifest.json` (sha256); a
changed or missing file stops the load with a log line, so the model never becomes ready.
"""

import json
import os
import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import kiln_engine  # noqa: E402  (copied beside this file by Kiln's package stage)
import kiln_manifest  # noqa: E402
import kiln_runtime  # noqa: E402
import kiln_tracing  # noqa: E402

PARAMS = {"max_tokens": int, "temperature": float, "top_k": int, "top_p": float, "seed": int, "speculative": bool}
SECONDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


def scalar(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy().reshape(-1)


def text_of(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def trace_context(request) -> str | None:
    """Triton's trace context of a request (JSON of W3C headers), None when Triton does not trace it."""
    try:
        trace = request.trace()
        return trace.get_context() if trace is not None else None
    except Exception:  # a backend without the trace API, or tracing off in tritonserver
        return None


def error_response(message: str):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))


def string_tensor(name: str, text: str):
    return pb_utils.Tensor(name, np.array([text.encode("utf-8")], dtype=object))


def text_response(text: str):
    return pb_utils.InferenceResponse(output_tensors=[string_tensor("text_output", text)])


def final_response(text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int, drafts=None):
    """The last response of a request: the text (all of it, or empty when streamed), why it ended
    ("eos", "stop", "length", "cancelled"), the token counts an OpenAI `usage` needs and, from the
    request's drafter's `DraftStats`, its accepted and rejected drafted tokens."""
    accepted, drafted = (drafts.accepted, drafts.drafted) if drafts is not None else (0, 0)
    return pb_utils.InferenceResponse(output_tensors=[
        string_tensor("text_output", text),
        string_tensor("finish_reason", finish_reason),
        pb_utils.Tensor("prompt_tokens", np.array([prompt_tokens], dtype=np.int32)),
        pb_utils.Tensor("completion_tokens", np.array([completion_tokens], dtype=np.int32)),
        pb_utils.Tensor("accepted_draft_tokens", np.array([accepted], dtype=np.int32)),
        pb_utils.Tensor("rejected_draft_tokens", np.array([drafted - accepted], dtype=np.int32)),
    ])


class Metrics:
    """The model's custom metrics, one set of labels per loaded model version."""

    def __init__(self, labels: dict):
        family = pb_utils.MetricFamily
        self.families = []  # a Metric is usable only while its MetricFamily object lives

        def metric(name, description, kind, **kwargs):
            self.families.append(family(name=name, description=description, kind=kind))
            return self.families[-1].Metric(labels=labels, **kwargs)

        def histogram(name, description, buckets):
            return metric(name, description, family.HISTOGRAM, buckets=buckets)

        self.ttft = histogram("kiln_time_to_first_token_seconds", "Arrival to first generated token", SECONDS)
        self.per_token = histogram("kiln_time_per_output_token_seconds", "Mean time between the tokens of one request", SECONDS)
        self.queue_wait = histogram("kiln_queue_wait_seconds", "Arrival to joining the running batch", SECONDS)
        self.tokens = histogram("kiln_generated_tokens", "Tokens generated per finished request", TOKENS)
        self.active = metric("kiln_active_rows", "Requests decoding in the running batch", family.GAUGE)
        self.cancelled = metric("kiln_cancelled_requests_total", "Requests stopped because their client went away", family.COUNTER)
        self.prompt_tokens = metric("kiln_prompt_tokens_total", "Prompt tokens of admitted requests", family.COUNTER)
        self.cached_tokens = metric("kiln_prefix_cache_hit_tokens_total", "Prompt tokens whose keys and values came from the prefix cache",
                                    family.COUNTER)
        # speculative decoding (package.speculative): accepted / drafted is the acceptance rate,
        # accepted / verifications the mean accepted length
        self.verifications = metric("kiln_speculative_verifications_total", "Forwards that verified a draft", family.COUNTER)
        self.drafted = metric("kiln_speculative_drafted_tokens_total", "Drafted tokens verified", family.COUNTER)
        self.accepted = metric("kiln_speculative_accepted_tokens_total", "Drafted tokens accepted", family.COUNTER)
        # per draft position (label position="1" is a draft's first token): accepted / drafted at a
        # position is its acceptance rate, which says how long drafts should be
        self.by_position = {kind: family(name=f"kiln_speculative_{kind}_tokens_by_position_total",
                                         description=f"Drafted tokens {kind}, by position in their draft", kind=family.COUNTER)
                            for kind in ("drafted", "accepted")}
        self.families.extend(self.by_position.values())
        self.position_metrics = {}  # (kind, position) -> Metric, made as drafts reach the position
        self.labels = labels
        # autoscaling signals: vLLM's num_requests_waiting and its batch occupancy under Kiln's names
        self.waiting = metric("kiln_requests_waiting", "Requests admitted and waiting for a row of the running batch", family.GAUGE)
        self.utilization = metric("kiln_batch_utilization", "Rows of the running batch in use, 0 to 1 (KV memory is per row)",
                                  family.GAUGE)
        refused = family(name="kiln_requests_refused_total", description="Requests refused as server busy (full, or pushed "
                         "out by a higher class), by priority class", kind=family.COUNTER)
        self.families.append(refused)
        self.refused = [refused.Metric(labels={**labels, "priority": name}) for name in kiln_engine.PRIORITY_CLASSES]

    def count_at(self, kind: str, position: int, total: int) -> None:
        """Bring the by-position counter of `kind` ("drafted" or "accepted") at `position` up to `total`."""
        key = (kind, position)
        if key not in self.position_metrics:
            self.position_metrics[key] = [self.by_position[kind].Metric(labels={**self.labels, "position": str(position)}), 0]
        metric, shown = self.position_metrics[key]
        if total > shown:
            metric.increment(total - shown)
            self.position_metrics[key][1] = total


class Client:
    """One admitted request: how its text goes back, and its timings."""

    def __init__(self, request, sender, parsed, stream: bool, arrived: float, metrics: Metrics, trace=None, before_final=None):
        self.request, self.sender, self.stream, self.arrived, self.metrics = request, sender, stream, arrived, metrics
        # called just before the last response goes out: counters the request contributed to are
        # up to date when its client sees the end of its stream (a scrape right after is consistent)
        self.before_final = before_final
        self.parsed = parsed
        self.text, self.tokens, self.first = "", 0, None  # first: when the first token went out
        self.row = None
        self.trace = trace  # (ModelTracing, parent context) when this request is traced
        self.admitted = None

    def end_trace(self, finish_reason: str) -> None:
        """The request's spans, once, when it ends (finished, cancelled or failed)."""
        if self.trace is None:
            return
        tracing, parent = self.trace
        self.trace = None
        wall = time.time() - time.monotonic()  # monotonic timings as wall-clock nanoseconds
        at = {k: None if v is None else int((v + wall) * 1e9) for k, v in
              (("arrived", self.arrived), ("admitted", self.admitted), ("first_token", self.first), ("ended", time.monotonic()))}
        tracing.record(parent, at, {"gen_ai.usage.input_tokens": len(self.parsed.prompt_ids),
                                    "gen_ai.usage.output_tokens": kiln_engine.completion_tokens(self.tokens, finish_reason),
                                    "gen_ai.response.finish_reasons": [finish_reason],
                                    "kiln.cached_prompt_tokens": getattr(self.row, "cached", None)})

    def gone(self) -> bool:
        # one call to the server per row and step (each is a round trip to tritonserver): the
        # request's flag, which Triton sets when the gRPC stream is cancelled or closed
        check = getattr(self.request, "is_cancelled", None)
        return bool(check is not None and check())

    def emit(self, delta: str, finish_reason) -> None:
        now = time.monotonic()
        if self.first is None:
            self.metrics.ttft.observe(now - self.arrived)
            self.first = now
        self.tokens += 1
        self.text += delta
        if self.stream and delta:
            self.sender.send(text_response(delta))
        if finish_reason is not None:
            self.metrics.tokens.observe(self.tokens)
            if self.tokens > 1:  # one observation per request: each observe is a round trip to the server
                self.metrics.per_token.observe((now - self.first) / (self.tokens - 1))
            completion = kiln_engine.completion_tokens(self.tokens, finish_reason)
            drafter = getattr(self.row, "drafter", None)
            if self.before_final is not None:
                self.before_final()
            self.sender.send(final_response("" if self.stream else self.text, finish_reason, len(self.parsed.prompt_ids), completion,
                                            drafter.stats if drafter is not None else None),
                             flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            self.end_trace(finish_reason)


class TritonPythonModel:
    def initialize(self, args):
        version_dir = Path(args["model_repository"]) / args["model_version"]
        try:
            kiln_manifest.check_folder(version_dir)
        except kiln_manifest.ManifestMismatch as e:
            pb_utils.Logger.log_error(f"kiln: refusing to load a model repository that differs from its manifest: {e}")
            raise
        from tokenizers import Tokenizer

        serving = json.loads((version_dir / "serving.json").read_text())
        engine_dir = version_dir / "engine"
        # a KIND_GPU instance runs on the GPU Triton gave it; a target whose runtime is not in this
        # Python (onnxruntime-gpu, tensorrt) stops the load with a log line: the model is never ready
        device_id = int(args.get("model_instance_device_id") or 0)
        try:
            self.lm = kiln_runtime.load_engine(engine_dir, serving["session_options"], device_id)
        except kiln_runtime.MissingRuntime as e:
            pb_utils.Logger.log_error(f"kiln: cannot run this engine here: {e}")
            raise
        self.tokenizer = Tokenizer.from_file(str(engine_dir / "tokenizer.json"))
        self.eos_ids = set(serving["eos_token_ids"])
        self.limits = kiln_engine.Limits(**serving["limits"])
        self.max_batch = int(serving["max_batch"])
        self.max_queue = int(serving["max_queue"])
        self.scheduler_options = dict(serving.get("scheduler", {}))
        # a draft model (package.speculative method draft): its engine sits in the version folder,
        # checked with it against the manifest above
        self.scheduler_options["draft_lm"] = kiln_runtime.load_draft_engine(self.scheduler_options.get("speculative"), version_dir)
        self.metrics = Metrics({"model": args["model_name"], "version": args["model_version"]})
        endpoint = os.environ.get("KILN_OTLP_ENDPOINT")  # set by `kiln serve --otlp-endpoint`
        self.tracing = kiln_tracing.ModelTracing(endpoint) if endpoint else None
        self.pending = kiln_engine.WaitingRoom()
        self.clients = []  # admitted, not finished
        self.shown_active = self.shown_waiting = 0
        self.free_rows = self.max_batch  # written by the worker after each step, read by execute
        self.stopping = threading.Event()
        self.drain_file = os.environ.get("KILN_DRAIN_FILE")
        self.worker = threading.Thread(target=self.run, daemon=True)
        self.worker.start()

    def execute(self, requests):
        now = time.monotonic()
        for request in requests:
            sender = request.get_response_sender()
            try:
                prompt = scalar(request, "text_input")
                if prompt is None or len(prompt) != 1:
                    raise kiln_engine.RequestError("text_input (one string) is required")
                params = {k: cast(v[0]) for k, cast in PARAMS.items() if (v := scalar(request, k)) is not None and len(v)}
                stop = scalar(request, "stop")
                params["stop"] = [text_of(s) for s in stop] if stop is not None else []
                stream = scalar(request, "stream")
                parsed = kiln_engine.parse_request(text_of(prompt[0]), params, self.tokenizer, self.limits)
            except (kiln_engine.RequestError, ValueError, TypeError, OverflowError, UnicodeDecodeError) as e:
                sender.send(error_response(str(e)), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            if self.stopping.is_set():
                sender.send(error_response("server shutting down"), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            # a request waits only for a row: as many as are free (the worker's last count) go
            # straight in, `max_queue` more may wait; beyond that a lower class's waiting request
            # gives up its place (kiln_engine.WaitingRoom), else this one is refused now
            rank = scalar(request, "priority")
            rank = kiln_engine.class_rank(rank[0]) if rank is not None and len(rank) else kiln_engine.DEFAULT_RANK
            tenant = scalar(request, "tenant")
            trace = None
            if self.tracing is not None:  # the context of Triton's span for this request: the model's spans join its trace
                trace = (self.tracing, self.tracing.parent(trace_context(request)))
            item = (request, sender, parsed, bool(stream[0]) if stream is not None and len(stream) else False, now, rank, trace)
            admitted, pushed_out = self.pending.offer(item, rank, text_of(tenant[0]) if tenant is not None and len(tenant) else "",
                                                      capacity=self.free_rows + self.max_queue)
            for refused, why in ((pushed_out, "a higher-priority request took its place"), (None if admitted else item, "")):
                if refused is not None:
                    self.metrics.refused[refused[5]].increment(1)
                    refused[1].send(error_response(f"server busy: {self.max_batch} requests running and {self.max_queue} waiting"
                                                   f"{'; ' + why if why else ''}; retry later"),
                                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

    def new_scheduler(self):
        self.shown_drafts = (0, 0, 0)  # a new scheduler counts from zero
        for shown in self.metrics.position_metrics.values():
            shown[1] = 0
        return kiln_engine.Scheduler(self.lm, self.tokenizer, self.eos_ids, self.max_batch, **self.scheduler_options)

    def show_drafts(self, running):
        stats = running.draft_stats
        counts = (stats.verifications, stats.drafted, stats.accepted)
        if counts != self.shown_drafts:
            for metric, now, shown in zip((self.metrics.verifications, self.metrics.drafted, self.metrics.accepted), counts, self.shown_drafts):
                if now > shown:
                    metric.increment(now - shown)
            for kind, by_position in (("drafted", stats.drafted_at), ("accepted", stats.accepted_at)):
                for position, now in enumerate(by_position, start=1):
                    self.metrics.count_at(kind, position, now)
            self.shown_drafts = counts

    def run(self):
        running = self.new_scheduler()
        while True:
            try:
                if not self.iterate(running):
                    break
            except Exception as e:  # the server keeps serving; every running request gets the error
                pb_utils.Logger.log_error(f"kiln: generation failed: {e!r}")
                for client in self.clients:
                    self.close(client, f"generation failed: {e}")
                self.clients = []
                running = self.new_scheduler()
            self.show_active(running)
        self.end_all(running)

    def end_all(self, running):
        """Stopping: every admitted or waiting request gets its final response now, finish_reason "cancelled"."""
        for client in self.clients:
            running.cancel(client.row)
            try:
                client.emit("", "cancelled")
            except Exception:
                pass  # its client is gone
        self.clients = []
        for _request, sender, parsed, *_ in self.pending.drain():
            # a final response, not an error: tritonserver 2.51 then never unloads the model (measured)
            self.metrics.cancelled.increment(1)
            try:
                sender.send(final_response("", "cancelled", len(parsed.prompt_ids), 0), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except Exception:
                pass  # its client is gone

    def show_active(self, running):
        self.free_rows = running.free
        if running.active != self.shown_active:  # a gauge update is a round trip to the server: only on change
            self.metrics.active.set(running.active)
            self.metrics.utilization.set(running.active / self.max_batch)
            self.shown_active = running.active
        if len(self.pending) != self.shown_waiting:
            self.shown_waiting = len(self.pending)
            self.metrics.waiting.set(self.shown_waiting)

    def iterate(self, running) -> bool:
        """Admit what waits (block only when nothing runs), drop cancelled rows, decode one step.
        False once finalize asked the worker to stop."""
        if self.stopping.is_set() or (self.drain_file and os.path.exists(self.drain_file)):
            self.stopping.set()
            return False
        arrivals, stopping = [], False
        try:
            while len(arrivals) < running.free:
                item = self.pending.get(block=not running.active and not arrivals)
                if item is None:
                    stopping = True
                    break
                client = Client(*item[:5], self.metrics, item[6], before_final=lambda: self.show_drafts(running))
                if client.gone():  # cancelled while it waited
                    self.metrics.cancelled.increment(1)
                    self.close(client, None)
                    continue
                arrivals.append(client)
        except queue.Empty:
            pass
        self.admit(running, arrivals)
        if stopping:
            return False
        gone = [c for c in self.clients if c.gone()]
        for client in gone:
            running.cancel(client.row)
            self.close(client, None)
        if gone:  # the gauge shows the rows gone before the counter counts them: a reader never sees one without the other
            self.show_active(running)
            self.metrics.cancelled.increment(len(gone))
        running.step()
        self.show_drafts(running)  # also before each request's last response (Client.before_final)
        self.clients = [c for c in self.clients if c.row.seq.finish_reason is None]
        return True

    def admit(self, running, arrivals):
        """The requests that arrived since the last step join the batch, prefilled together."""
        if not arrivals:
            return
        now = time.monotonic()
        for client in arrivals:
            client.admitted = now
            self.metrics.queue_wait.observe(now - client.arrived)
        rows = running.admit_many([(client.parsed, client.emit) for client in arrivals])
        for client, row in zip(arrivals, rows):
            client.row = row
            self.clients.append(client)
        self.metrics.prompt_tokens.increment(sum(len(row.prompt) for row in rows))
        cached = sum(row.cached for row in rows)
        if cached:
            self.metrics.cached_tokens.increment(cached)

    @staticmethod
    def close(client, error):
        """End a request that will produce no more text (cancelled, or failed with `error`)."""
        client.end_trace("cancelled" if error is None else "error")
        try:
            if error is None:
                client.sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            else:
                client.sender.send(error_response(error), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception:
            pass  # already completed, or the client is gone

    def finalize(self):
        # the worker reads the queue only when a row is free: under full load the event stops it
        self.stopping.set()
        self.pending.close()
        self.worker.join(timeout=10)
        if self.tracing is not None:
            self.tracing.shutdown()  # what is still queued goes out before the model unloads
