"""`python -m ringlet batch --input IN.jsonl --output OUT.jsonl`: offline batch inference, resumable, over MPI.

Input: one JSON object per line (blank lines are skipped), either plain
    {"id": "q1", "prompt": "Once upon a time", "max_tokens": 32, "temperature": 0.7, "seed": 1, "stop": ["\\n"]}
    {"id": "q2", "messages": [{"role": "user", "content": "Hi"}]}
or an OpenAI batch request line, whose "body" holds the same fields:
    {"custom_id": "q3", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [...], "max_tokens": 8}}
"prompt" is a string or a list of token ids; "messages" go through the model's chat template. Sampling fields:
max_tokens, temperature, top_p, top_k, seed, stop, stop_token_ids, ignore_eos (missing ones: the command's flags).

Output: one line per input object, in input order: {"id", "index", "text", "token_ids", "finish_reason", "usage":
{"prompt_tokens", "completion_tokens"}}, or {"id", "index", "error"} for a line that cannot run (bad JSON, bad
parameters, a prompt beyond the context): one bad line never stops the batch. "custom_id" is kept when given.

Resuming: every finished line is appended to OUT.journal (JSON with the line's index and a hash of its text) and
fsync'ed before it counts as done. A rerun reads the journal (dropping a torn last record, and records whose input
line changed), skips those lines, and runs only the rest; when every line is done, OUT is written in input order to
a temporary file, fsync'ed, renamed over OUT, and the journal is removed. A rerun after that finds OUT complete
(same ids in the same places) and has nothing to do. So a job killed at any moment loses no finished line, and no
line appears twice in OUT.

Ranks: with N ranks (`./launch.sh -n N batch ...`) and --tp T, N / T replicas (--dp) share the lines: rank 0 reads
the input, hands lines to the least-loaded replica as they free up, journals results and shows a progress bar.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import RingletError
from .replica_setup import add_rank_flags

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos")


def add_parser(sub, add_model_flags, add_sampling_flags) -> None:
    p = sub.add_parser("batch", help="offline batch inference over a JSONL file (resumable; MPI ranks share it)")
    p.add_argument("--input", required=True, help="JSONL file: one request object per line")
    p.add_argument("--output", required=True, help="JSONL file written in input order (OUT.journal while running)")
    add_rank_flags(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_sampling_flags(p, temperature=0.0)
    add_model_flags(p)


# ------------------------------------------------------------------------------------------------------ input

@dataclass
class Line:
    index: int
    digest: str
    ident: str
    id_key: str  # "id" or "custom_id": the key the output repeats
    item: dict | None  # {"prompt" | "messages", "params"}, or None when the line is bad
    error: str | None = None


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def parse_line(index: int, number: int, text: str, defaults: dict) -> Line:
    digest = _digest(text)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return Line(index, digest, f"line-{number}", "id", None, f"line {number}: invalid JSON: {e}")
    if not isinstance(obj, dict):
        return Line(index, digest, f"line-{number}", "id", None, f"line {number}: expected a JSON object")
    id_key = "custom_id" if "custom_id" in obj else "id"
    ident = str(obj.get(id_key, f"line-{number}"))
    body = obj["body"] if isinstance(obj.get("body"), dict) else obj
    params = dict(defaults)
    params.update({k: body[k] for k in SAMPLING_FIELDS if k in body and body[k] is not None})
    if isinstance(params.get("stop"), str):
        params["stop"] = [params["stop"]]
    if body.get("n", 1) != 1:
        return Line(index, digest, ident, id_key, None, f"line {number}: n={body['n']!r}: only n=1 is supported")
    has_prompt, has_messages = "prompt" in body, "messages" in body
    if has_prompt == has_messages:
        return Line(index, digest, ident, id_key, None,
                    f"line {number}: needs exactly one of 'prompt' or 'messages'")
    if has_messages:
        messages = body["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "content" in m for m in messages):
            return Line(index, digest, ident, id_key, None,
                        f"line {number}: 'messages' must be a list of {{role, content}} objects")
        return Line(index, digest, ident, id_key, {"messages": messages, "params": params})
    return Line(index, digest, ident, id_key, {"prompt": body["prompt"], "params": params})


def read_input(path: str, defaults: dict) -> list[Line]:
    try:
        with open(path, encoding="utf-8") as f:
            texts = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RingletError(f"cannot read --input {path}: {e}") from None
    lines = []
    for number, text in enumerate(texts, 1):
        if text.strip():
            lines.append(parse_line(len(lines), number, text.strip(), defaults))
    return lines


# ------------------------------------------------------------------------------------------ journal and output

def output_record(line: Line, result: dict) -> dict:
    record = {line.id_key: line.ident, "index": line.index}
    if "error" in result:
        record["error"] = result["error"]
        return record
    record.update(text=result["text"], token_ids=result["token_ids"], finish_reason=result["finish_reason"],
                  usage={"prompt_tokens": result["prompt_tokens"], "completion_tokens": len(result["token_ids"])})
    return record


class Journal:
    """Finished lines of an unfinished run: OUT.journal, one {"index", "digest", "record"} per line, fsync'ed."""

    def __init__(self, output: Path):
        self.path = output.with_name(output.name + ".journal")
        self._file = None

    def load(self, lines: list[Line]) -> dict[int, dict]:
        """index -> output record of every journaled line that still matches the input; a torn tail is cut."""
        done: dict[int, dict] = {}
        if not self.path.exists():
            return done
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1  # a record counts only once its newline is on disk
        if keep < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                os.fsync(f.fileno())
        for raw in data[:keep].splitlines():
            try:
                entry = json.loads(raw)
                i = entry["index"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
            if isinstance(i, int) and 0 <= i < len(lines) and entry.get("digest") == lines[i].digest:
                done[i] = entry["record"]
        return done

    def append(self, line: Line, record: dict) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps({"index": line.index, "digest": line.digest, "record": record}) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def load_finished_output(output: Path, lines: list[Line]) -> dict[int, dict]:
    """Records of a complete OUT from an earlier run whose ids sit at the same indices (else nothing)."""
    if not output.exists():
        return {}
    try:
        records = [json.loads(t) for t in output.read_text(encoding="utf-8").splitlines() if t.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    if len(records) != len(lines):
        return {}
    for line, rec in zip(lines, records):
        if not isinstance(rec, dict) or rec.get("index") != line.index or rec.get(line.id_key) != line.ident:
            return {}
    return dict(enumerate(records))


def write_output(output: Path, records: dict[int, dict], n: int) -> None:
    tmp = output.with_name(output.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(records[i]) + "\n" for i in range(n))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, output)
    try:  # make the rename itself durable
        fd = os.open(output.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


# ------------------------------------------------------------------------------------------------ running

def _defaults(args) -> dict:
    return {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
            "seed": args.seed, "stop": list(args.stop)}


class Driver:
    """Rank 0's bookkeeping: pending lines, the journal, the progress bar, the final output."""

    def __init__(self, args, tokenizer):
        self.output = Path(args.output)
        self.lines = read_input(args.input, _defaults(args))
        self.journal = Journal(self.output)
        self.records = load_finished_output(self.output, self.lines) if not self.journal.path.exists() else {}
        if not self.records:
            self.records = self.journal.load(self.lines)
        self.resumed = len(self.records)
        if self.resumed:
            print(f"ringlet batch: resuming: {self.resumed} of {len(self.lines)} lines already done",
                  file=sys.stderr, flush=True)
        self.items = []
        for line in self.lines:
            if line.index in self.records:
                continue
            if line.item is None:
                self.finish({"i": line.index, "error": line.error})
                continue
            prompt = line.item.get("prompt")
            if "messages" in line.item:
                if tokenizer is None:
                    self.finish({"i": line.index, "error": "this model has no tokenizer for 'messages'"})
                    continue
                try:
                    prompt = tokenizer.apply_chat_template(line.item["messages"])
                except Exception as e:  # a template that rejects these messages fails this line only
                    self.finish({"i": line.index, "error": f"chat template: {type(e).__name__}: {e}"})
                    continue
            self.items.append({"i": line.index, "prompt": prompt, "params": line.item["params"]})
        from tqdm import tqdm
        self.bar = tqdm(total=len(self.lines), initial=len(self.records), unit="line", file=sys.stderr,
                        disable=args.no_progress, mininterval=0.5, dynamic_ncols=True)

    def finish(self, result: dict) -> None:
        line = self.lines[result["i"]]
        record = output_record(line, result)
        self.journal.append(line, record)
        self.records[line.index] = record
        if hasattr(self, "bar"):
            self.bar.update(1)

    def close(self) -> dict:
        self.bar.close()
        if len(self.records) != len(self.lines):
            raise RingletError(f"internal: {len(self.records)} of {len(self.lines)} lines finished")
        write_output(self.output, self.records, len(self.lines))
        self.journal.remove()
        errors = sum("error" in r for r in self.records.values())
        return {"output": str(self.output), "lines": len(self.lines), "resumed": self.resumed, "errors": errors}


def cmd_batch(args) -> int:
    from ringlet.mpi.ranks import discover
    info = discover()
    if info.world_size == 1:
        return _run_single(args)
    return _run_ranks(args, info)


def _run_single(args) -> int:
    from ringlet.mpi.parallel import make_layout
    from ringlet.mpi.router import ReplicaServer, route

    from .engine import Engine
    from .replica_setup import engine_config
    make_layout(1, 0, args.tp, args.dp)
    engine = Engine.from_path(args.model, engine_config(args, args.device))
    driver = Driver(args, engine.tokenizer)
    route(ReplicaServer(engine), driver.items, driver.finish, capacity=args.max_num_seqs)
    print(json.dumps({**driver.close(), "steps_ahead": engine.steps_ahead}))
    return 0


def _run_ranks(args, info) -> int:
    from ringlet.mpi.control import Mailbox
    from ringlet.mpi.router import ReplicaServer, follow, route

    from .replica_setup import run_on_ranks

    def prepare(layout, replica):
        return Driver(args, replica.engine.tokenizer) if info.rank == 0 else None

    def work(layout, replica, messages, driver):
        if layout.leader:
            mailbox = Mailbox(messages)
            server = ReplicaServer(replica.engine)
            if info.rank == 0:
                route(server, driver.items, driver.finish, args.max_num_seqs, mailbox, layout.leaders)
            else:
                follow(server, mailbox)
            replica.stop_workers()
        else:
            replica.serve_plans()
        return {**driver.close(), "steps_ahead": replica.engine.steps_ahead} if info.rank == 0 else None

    done = run_on_ranks(args, info, prepare, work)
    if done is None:
        return 1
    layout, summary = done
    if info.rank == 0:
        print(json.dumps({**summary, "ranks": info.world_size, "tp": layout.tp, "dp": layout.dp}))
    return 0
