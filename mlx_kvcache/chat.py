"""`python -m mlx_kvcache.chat`: a chat in the terminal over ChatSession.

Replies stream as they are generated; after each, one line says how full the
context is, the KV bytes held and the decode speed. Ctrl-C during a reply ends
the reply (what was said stays said), during the reading of a question or a
document it cancels that turn, and at the prompt it clears the line; Ctrl-D
leaves. With stdin not a terminal, each line is a turn (or a command) and the
replies are printed as plain text, for scripts.

Under mlx.launch the model is sharded over the ranks: rank 0 reads every line
and document and hands them to the others, and only rank 0 prints. mlx.launch
gives the ranks pipes, not a terminal, so it is the line-per-turn mode; it
never passes the end of its input on, so /exit ends the chat (Ctrl-D does not),
and Ctrl-C ends mlx.launch and every rank with it (the --session file keeps
every finished turn).
"""

import os
import signal
import sys
from pathlib import Path

from mlx_kvcache.chat_session import ChatSession, TurnInterrupted, document_text
from mlx_kvcache.cli import Parser, add_model_flags, load_model, policy_args, run_command
from mlx_kvcache.distributed import from_rank0, shared_seed, speaks, world
from mlx_kvcache.errors import UserError
from mlx_kvcache.generate import DEFAULT_PREFILL_STEP

HELP = """commands:
  /file PATH     put a document into the conversation (read now)
  /reset         forget the conversation
  /save [PATH]   save the session (default: the --session file)
  /load PATH     continue a saved session
  /stats         what the cache holds, per layer
  /help          this text
  /exit          leave (also Ctrl-D)
A line of three double quotes starts and ends a multi-line message."""


def setup_arg_parser():
    parser = Parser(prog="python -m mlx_kvcache.chat",
                    description="Chat with a long document under a swappable KV-cache policy.")
    parser.add_argument("--system-prompt", default=None)
    parser.add_argument("--file", action="append", default=[],
                        help="a document to put into the conversation first (repeatable)")
    parser.add_argument("--session", default=None,
                        help="restore this session file if it exists; save it after every turn")
    add_model_flags(parser, max_tokens=512, prefill_step=DEFAULT_PREFILL_STEP)
    return parser


class Interrupts:
    """Ctrl-C as a request, not an exception, while the model runs: a
    KeyboardInterrupt raised in the middle of a step could leave some layers'
    caches a token ahead of the others. Not `enabled` (sharded), Ctrl-C stays
    an exit: mlx.launch ends on it, and a rank that lived on would wait for
    input that never comes."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.requested = enabled, False

    def __enter__(self):
        self.requested = False
        if self.enabled:
            self.previous = signal.signal(signal.SIGINT, self._request)
        return self

    def __exit__(self, *exc):
        if self.enabled:
            signal.signal(signal.SIGINT, self.previous)

    def _request(self, signum, frame):
        self.requested = True

    def check_prefill(self, done, total):
        """A progress callback: a bar on a terminal, and Ctrl-C cancels."""
        if sys.stderr.isatty():
            width = 30
            filled = width * done // max(total, 1)
            end = "\n" if done >= total else ""
            sys.stderr.write(f"\rreading [{'#' * filled}{'.' * (width - filled)}] "
                             f"{done}/{total} tokens{end}")
            sys.stderr.flush()
        if self.requested:
            raise TurnInterrupted()


class Repl:
    """The loop of turns. Sharded (`group`), every rank runs it, on what rank
    0 reads; the others say nothing."""

    def __init__(self, session: ChatSession, args, interactive: bool, group=None):
        self.session, self.args, self.interactive = session, args, interactive
        self.group = group
        self.reads = group is None or group.rank() == 0
        self.interrupts = Interrupts(enabled=group is None)

    def say(self, line: str) -> None:
        if self.reads:
            print(line, file=sys.stderr, flush=True)

    def tell_notices(self) -> None:
        for notice in self.session.notices:
            self.say(f"note: {notice}")
        self.session.notices.clear()

    def status_line(self) -> str:
        s = self.session.stats()
        limit = f"/{s['context_limit']}" if s["context_limit"] else ""
        speed = f", {s['decode_tok_per_s']:.1f} tok/s" if s["decode_tok_per_s"] else ""
        return (f"[{s['context_tokens']}{limit} tokens of context, "
                f"{s['kv_bytes'] / 2**20:.1f} MiB KV ({s['policy']}){speed}]")

    def autosave(self) -> None:
        if self.args.session:
            self.session.save(self.args.session)

    def ask(self, text: str) -> None:
        with self.interrupts as ctrl_c:
            try:
                for response in self.session.send(
                        text, progress=ctrl_c.check_prefill, stop=lambda: ctrl_c.requested):
                    sys.stdout.write(response.text)
                    sys.stdout.flush()
            except TurnInterrupted:
                self.say("\n(cancelled: the question was not sent)")
                return
        sys.stdout.write("\n")
        sys.stdout.flush()
        if self.session.last_reply.finish_reason == "interrupted":
            self.say("(stopped)")
        self.tell_notices()
        self.say(self.status_line())
        self.autosave()

    def add_document(self, path: str) -> None:
        document = None
        if self.reads:
            try:
                document = {"text": document_text(Path(path).expanduser())}
            except UserError as e:
                document = {"error": str(e)}
        document = from_rank0(self.group, document)
        if "error" in document:
            raise UserError(document["error"])
        with self.interrupts as ctrl_c:
            try:
                n = self.session.add_document(document["text"], progress=ctrl_c.check_prefill)
            except TurnInterrupted:
                self.say("\n(cancelled: the document was not added)")
                return
        self.tell_notices()
        self.say(f"added {path}: {n} tokens. {self.status_line()}")
        self.autosave()

    def command(self, line: str) -> bool:
        """Run a /command; False to leave."""
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name == "/help":
            self.say(HELP)
        elif name == "/reset":
            self.session.reset()
            self.say("conversation cleared")
            self.autosave()
        elif name == "/file":
            if not rest:
                raise UserError("/file needs a path")
            self.add_document(rest)
        elif name == "/save":
            path = rest or self.args.session
            if not path:
                raise UserError("/save needs a path (or start with --session FILE)")
            self.session.save(path)
            self.say(f"saved to {path}")
        elif name == "/load":
            if not rest:
                raise UserError("/load needs a path")
            self.session = ChatSession.load(rest, self.session.model, self.session.tokenizer,
                                            max_tokens=self.args.max_tokens)
            self.say(f"loaded {rest}: {len(self.session.messages)} messages. "
                     f"{self.status_line()}")
        elif name == "/stats":
            stats = self.session.stats()
            self.say(self.status_line())
            for i, layer in enumerate(stats["layers"]):
                self.say(f"  layer {i}: " + ", ".join(
                    f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in layer.items()))
        else:
            raise UserError(f"unknown command {name} (/help lists them)")
        return True

    def read_message(self):
        """The next message or command; None at the end of input."""
        return from_rank0(self.group, self._read_message() if self.reads else None)

    def _read_message(self):
        prompt = ">>> " if self.interactive else ""
        while True:
            try:
                line = input(prompt)
            except KeyboardInterrupt:
                # Ctrl-C at the prompt clears the line.
                sys.stdout.write("\n")
                continue
            except EOFError:
                return None
            if line.strip() != '"""':
                return line
            lines = []
            while True:
                try:
                    more = input("... " if self.interactive else "")
                except EOFError:
                    return "\n".join(lines)
                except KeyboardInterrupt:
                    sys.stdout.write("\n")
                    lines = None
                    break
                if more.strip() == '"""':
                    return "\n".join(lines)
                lines.append(more)
            if lines is None:
                continue

    def loop(self) -> None:
        if self.interactive:
            self.say("type a message, /help for commands, Ctrl-D to leave")
        while True:
            line = self.read_message()
            if line is None:
                return
            if not line.strip():
                continue
            try:
                if line.startswith("/"):
                    if not self.command(line.strip()):
                        return
                else:
                    self.ask(line)
            except UserError as e:
                if not self.interactive:
                    raise
                self.say(f"error: {e}")


def run(args) -> None:
    import mlx.core as mx


    asked = args.policy or (args.max_kv_size and "streaming")
    flags = policy_args(args)
    group = world()
    speaker = speaks(group)
    if group is not None:
        args.seed = shared_seed(group, args.seed)
    if args.seed is not None:
        mx.random.seed(args.seed)
    model, tokenizer = load_model(args, shardable=True)
    sampling = {"max_tokens": args.max_tokens, "temp": args.temp, "top_p": args.top_p,
                "prefill_step_size": args.prefill_step_size}
    # Rank 0's file decides; each rank then reads its own shard of it.
    if from_rank0(group, bool(args.session) and os.path.exists(args.session)):
        session = ChatSession.load(args.session, model, tokenizer, asked, **sampling)
        if speaker:
            print(f"restored {args.session}: {len(session.messages)} messages",
                  file=sys.stderr)
    else:
        session = ChatSession(model, tokenizer, args.policy, args.system_prompt,
                              **sampling, **flags)
    repl = Repl(session, args, interactive=sys.stdin.isatty() and group is None, group=group)
    for path in args.file:
        repl.add_document(path)
    repl.loop()


def main(argv=None) -> int:
    return run_command(run, setup_arg_parser().parse_args(argv))


if __name__ == "__main__":
    from mlx_kvcache.process import exit_now

    exit_now(main())
