"""A conversation whose KV cache carries from turn to turn, under any policy.

The chat template renders the whole conversation each turn; what is fed to the
model is only the text past what the cache already holds. The cache's text is
kept beside it: if a template renders earlier turns differently (Qwen3 drops
thinking blocks, some templates move the system prompt), the new rendering no
longer starts with it. The cache then goes back to the last turn's end that the
rendering still starts with, trimmed where the policy can forget tokens exactly
(full, RefreshKV), or the conversation is read again from the start; `notices`
says which. A conversation that differs from the rendered one is never fed.
"""

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, List, Optional

from mlx_kvcache.cache_file import read_cache, restore, save_cache, snapshot
from mlx_kvcache.errors import UserError
from mlx_kvcache.generate import (DEFAULT_PREFILL_STEP, GenerationResponse, make_sampler,
                                  prefill, stream_generate)
from mlx_kvcache.policies import make_cache, reads_prompts_in_full, take_over, trimmable

SESSION_FORMAT = "mlx_kvcache.chat/1"


class TurnInterrupted(Exception):
    """Raised by a progress callback to stop reading a prompt or document; the
    session is left as it was before the turn."""


class ChatSession:
    """`ChatSession(model, tokenizer, policy="refreshkv", system_prompt=...)`,
    then `for r in session.send("question"): print(r.text, end="")`."""

    def __init__(self, model, tokenizer, policy: str = "full",
                 system_prompt: Optional[str] = None, *, max_tokens: int = 512,
                 temp: float = 0.0, top_p: float = 1.0,
                 prefill_step_size: int = DEFAULT_PREFILL_STEP, **policy_args):
        if not tokenizer.has_chat_template:
            raise UserError("this model has no chat template (a base model): chat needs an "
                            "instruction-tuned one; `python -m mlx_kvcache.generate` "
                            "continues plain text")
        self.model, self.tokenizer = model, tokenizer
        self.policy, self.policy_args = policy, dict(policy_args)
        self.system_prompt = system_prompt
        self.max_tokens, self.temp, self.top_p = max_tokens, temp, top_p
        self.prefill_step_size = prefill_step_size
        self.notices: List[str] = []  # things the caller should tell the user
        self.reset()

    # ------------------------------------------------------------ the turns

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.cache = make_cache(self.model, self.policy, **self.policy_args)
        self.messages = []
        if self.system_prompt is not None:
            self.messages.append({"role": "system", "content": self.system_prompt})
        self.cached_text = ""  # the rendered text the cache holds, exactly
        # (characters of cached_text, tokens in the cache) where each turn ended:
        # where a trim can go back to.
        self.turn_ends = []
        self.last_reply = None  # the last GenerationResponse

    def add_document(self, path_or_text, *, progress: Optional[Callable] = None) -> int:
        """Put a document into the conversation as a user message and read it
        now, so the questions after it prefill only themselves. Returns its
        length in tokens. An exception raised by `progress` (Ctrl-C) leaves the
        session as it was."""
        message = {"role": "user", "content": document_text(path_or_text)}
        with self._turn():
            new_ids = self._new_tokens(self.messages + [message], generation_prompt=False)
            self._check_room(len(new_ids))
            prefill(self.model, self.cache, new_ids,
                    prefill_step_size=self.prefill_step_size, progress=progress)
            self.messages.append(message)
            self.turn_ends.append((len(self.cached_text), self.context_used()))
        return len(new_ids)

    def send(self, text: str, *, progress: Optional[Callable] = None,
             stop: Optional[Callable[[], bool]] = None) -> Iterator[GenerationResponse]:
        """Ask, and stream the reply. `stop()` is asked after every token: True
        ends the reply there, and what was said stays in the conversation (the
        history and the cache agree). An exception (from `progress`, or raised
        into the loop) leaves the session as it was before the question."""
        if not text.strip():
            raise UserError("empty message")
        question = {"role": "user", "content": text}
        with self._turn():
            new_ids = self._new_tokens(self.messages + [question], generation_prompt=True)
            self._check_room(len(new_ids) + 1)
            reply, response = [], None
            for response in stream_generate(
                self.model, self.tokenizer, new_ids, cache=self.cache,
                max_tokens=max(1, min(self.max_tokens, self._room() - len(new_ids))),
                sampler=make_sampler(self.temp, self.top_p),
                prefill_step_size=self.prefill_step_size, progress=progress,
            ):
                reply.append(response.text)
                try:
                    yield response
                except GeneratorExit:
                    # The caller stopped reading (a `break`): the reply ends here.
                    response.finish_reason = response.finish_reason or "interrupted"
                    break
                if response.finish_reason is None and stop is not None and stop():
                    response.finish_reason = "interrupted"
                    break
            content = "".join(reply)
            self.messages += [question, {"role": "assistant", "content": content}]
            # The cache holds the prompt and every token yielded, the end of
            # turn included.
            self.cached_text += content
            if response.finish_reason == "stop":
                self.cached_text += self.tokenizer.convert_ids_to_tokens(response.token)
            self.turn_ends.append((len(self.cached_text), self.context_used()))
            self.last_reply = response

    def fork(self, policy: str, **policy_args) -> "ChatSession":
        """This session as if it had been run under `policy` from the start,
        without reading its documents again: the new cache starts from this
        one's keys and values. Exact (tests) while this session is `full`
        and has only read (documents, no reply yet), for a policy that reads
        prompts in full (full, SnapKV, RefreshKV); anything else is refused."""
        if self.policy != "full" or self.last_reply is not None:
            raise UserError("only a full session that has not replied yet can be forked")
        if not reads_prompts_in_full(policy, policy_args):
            raise UserError(f"{policy} does not read prompts in full: it must read the "
                            "documents itself")
        other = ChatSession(self.model, self.tokenizer, policy, self.system_prompt,
                            max_tokens=self.max_tokens, temp=self.temp, top_p=self.top_p,
                            prefill_step_size=self.prefill_step_size, **policy_args)
        take_over(other.cache, self.cache)
        other.messages = [dict(m) for m in self.messages]
        other.cached_text, other.turn_ends = self.cached_text, list(self.turn_ends)
        return other

    @contextmanager
    def _turn(self):
        """Undo everything the block did to the session if it raises."""
        before = (snapshot(self.cache), self.cached_text, list(self.messages),
                  list(self.turn_ends), self.last_reply)
        try:
            yield
        except BaseException:
            self.cache = restore(before[0])
            self.cached_text, self.messages, self.turn_ends, self.last_reply = before[1:]
            raise

    def _new_tokens(self, messages, *, generation_prompt: bool) -> List[int]:
        """Render `messages`; the tokens of what the cache lacks (the whole
        rendering, into a new cache, if it no longer starts with what the cache
        holds). Sets `cached_text` to the rendering: the caller feeds them."""
        rendered = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt)
        if not rendered.startswith(self.cached_text):
            self._rewind(rendered)
        new_text = rendered[len(self.cached_text):]
        bos = self.tokenizer.bos_token
        add_special = not self.cached_text and not (bos and new_text.startswith(bos))
        self.cached_text = rendered
        return self.tokenizer.encode(new_text, add_special_tokens=add_special)

    def _rewind(self, rendered: str) -> None:
        """Go back to the last turn end that `rendered` still starts with."""
        agreed = len(os.path.commonprefix([rendered, self.cached_text]))
        ends = [end for end in self.turn_ends if end[0] <= agreed]
        if ends and trimmable(self.cache):
            text_length, tokens = ends[-1]
            dropped = self.context_used() - tokens
            for layer in self.cache:
                layer.trim(layer.offset - tokens)
            self.cached_text, self.turn_ends = self.cached_text[:text_length], ends
            self.notices.append(f"the chat template renders the last turns differently now; "
                                f"the cache forgot their {dropped} tokens and reads them again")
            return
        self.notices.append("the chat template renders the earlier turns differently "
                            "now; reading the whole conversation again")
        self.cache = make_cache(self.model, self.policy, **self.policy_args)
        self.cached_text, self.turn_ends = "", []

    # ---------------------------------------------------- the context limit

    @property
    def context_limit(self) -> Optional[int]:
        return getattr(self.model, "context_length", None)

    def runs_past_context(self) -> bool:
        """Streaming with slot positions never shows the model a position past
        its budget, so it can go on past the trained context."""
        return self.policy == "streaming" and self.policy_args.get("positions") == "cache"

    def context_used(self) -> int:
        return self.cache[0].offset

    def _room(self) -> int:
        if self.context_limit is None or self.runs_past_context():
            return 1 << 62
        return self.context_limit - self.context_used()

    def _check_room(self, needed: int) -> None:
        if needed > self._room():
            raise UserError(
                f"this turn needs {needed} more tokens; the context holds "
                f"{self.context_used()} of {self.context_limit}: /reset to start over, or "
                "use a policy that runs past the context (--policy streaming --positions cache)")

    # ------------------------------------------------------------ figures

    def stats(self) -> dict:
        reply = self.last_reply
        return {
            "policy": self.policy, "policy_args": self.policy_args,
            "context_tokens": self.context_used(), "context_limit": self.context_limit,
            "kv_bytes": sum(c.nbytes for c in self.cache),
            "turns": sum(m["role"] == "user" for m in self.messages),
            "decode_tok_per_s": reply.generation_tps if reply else None,
            "prefill_tok_per_s": reply.prompt_tps if reply else None,
            "layers": [c.stats() for c in self.cache],
        }

    # ------------------------------------------------------------ sessions

    def save(self, path) -> None:
        """Write the whole session (history, cache, policy) atomically."""
        save_cache(path, self.cache, self.model, extra={
            "format": SESSION_FORMAT, "policy": self.policy, "policy_args": self.policy_args,
            "system_prompt": self.system_prompt, "messages": self.messages,
            "cached_text": self.cached_text, "turn_ends": self.turn_ends,
            "sampling": {"max_tokens": self.max_tokens, "temp": self.temp, "top_p": self.top_p},
        })

    @classmethod
    def load(cls, path, model, tokenizer, policy: Optional[str] = None,
             **overrides) -> "ChatSession":
        """The session saved in `path`; a session of another policy than
        `policy` (if given) is refused. `overrides` (max_tokens, temp, top_p,
        prefill_step_size) replace the saved sampling settings."""
        cache, extra = read_cache(path, model)
        if not isinstance(extra, dict) or extra.get("format") != SESSION_FORMAT:
            found = extra.get("format") if isinstance(extra, dict) else "a bare cache"
            raise UserError(f"{path}: not a chat session of this version ({found})")
        if policy is not None and policy != extra["policy"]:
            raise UserError(f"{path} is a {extra['policy']!r} session, not {policy!r}")
        session = cls(model, tokenizer, extra["policy"], extra["system_prompt"],
                      **{**extra["sampling"], **overrides}, **extra["policy_args"])
        session.cache, session.messages = cache, extra["messages"]
        session.cached_text = extra["cached_text"]
        # Sessions saved before turn ends were kept: no trim point, a re-read.
        session.turn_ends = [tuple(end) for end in extra.get("turn_ends", [])]
        return session


def document_text(path_or_text) -> str:
    """The text of a document given as a path or as its text."""
    if isinstance(path_or_text, Path) or (
            isinstance(path_or_text, str) and "\n" not in path_or_text
            and Path(path_or_text).expanduser().is_file()):
        path = Path(path_or_text).expanduser()
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {path}: {e}") from None
    if not str(path_or_text).strip():
        raise UserError("the document is empty")
    return str(path_or_text)

