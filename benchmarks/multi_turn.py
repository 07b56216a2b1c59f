"""Multi-turn chat over one long document (SCBench's shared-context protocol,
on our texts): the document is read once, then questions come in turn, each
answered from the carried cache, for every policy at budget L/8.

The document: a GNU manual with five facts planted at depths 0.1-0.9 ("The
code of the heron is 48213."); the questions ask for them one per turn, in an
order that does not follow the document, then one open question whose answer
is scored against full's (ROUGE-L). Per turn: exact-match accuracy and time to
first token with the carried cache; for full, also the time to first token of
re-reading the whole conversation, which is what a chat without a carried cache
pays. Per policy: KV bytes, session file bytes, save and load time.

The document is read once, by a full session; the policies that read prompts
in full (SnapKV, RefreshKV) fork it (ChatSession.fork, tested exact), the
others read it themselves.

    python benchmarks/multi_turn.py [--quick] [--model smollm2] [--doc-tokens 6000]
    python benchmarks/multi_turn.py --model qwen2.5-coder-0.5b --doc-tokens 12000 \
        --policies full,streaming,snapkv,refreshkv --reread 1
    python benchmarks/multi_turn.py --model qwen2.5-coder-0.5b --doc-tokens 12000 \
        --policies h2o,mixed --add     # more policies beside the kept full run

Writes benchmarks/results/multi_turn.json (multi_turn_quick.json).
"""

import argparse
import random
import tempfile
import time
from pathlib import Path

from common import load_result, write_result

from mlx_kvcache import ChatSession, load
from mlx_kvcache.evaluate import read_text, rouge_l
from mlx_kvcache.policies import reads_prompts_in_full

TEXT = "/usr/share/info/gettext.info.gz"
ANIMALS = ["heron", "badger", "otter", "lynx", "marten"]
DEPTHS = [0.1, 0.3, 0.5, 0.7, 0.9]
ASK_ORDER = [2, 0, 4, 1, 3]  # not the document's order
OPEN_QUESTION = "In one sentence, what is this document about?"


def planted_document(tokenizer, n_tokens: int, seed: int = 0):
    """(the document text, [(animal, code)] in document order)."""
    rng = random.Random(seed)
    facts = [(animal, str(rng.randint(10000, 99999))) for animal in ANIMALS]
    words = read_text(TEXT)[20000:].split(" ")
    # Grow the filler until it has n_tokens tokens, then plant the facts by depth.
    filler = " ".join(words[: n_tokens])
    while len(tokenizer.encode(filler, add_special_tokens=False)) > n_tokens:
        filler = filler[: int(len(filler) * 0.95)]
    parts, at = [], 0
    for depth, (animal, code) in zip(DEPTHS, facts):
        cut = filler.rfind(". ", 0, int(depth * len(filler))) + 2
        parts += [filler[at:cut], f"The code of the {animal} is {code}. "]
        at = cut
    parts.append(filler[at:])
    return "".join(parts), facts


def question(animal: str) -> str:
    return f"What is the code of the {animal}? Answer with the number only."


SYSTEM = "Answer from the document."


def read(model, tokenizer, policy, args, document, max_tokens):
    """(a session of `policy` that has read the document, seconds, tokens)."""
    session = ChatSession(model, tokenizer, policy, SYSTEM, max_tokens=max_tokens, **args)
    start = time.perf_counter()
    doc_tokens = session.add_document(document)
    return session, time.perf_counter() - start, doc_tokens


def run_policy(session, facts, read_s, doc_tokens, log):
    policy, args = session.policy, session.policy_args
    model, tokenizer = session.model, session.tokenizer
    turns = []
    for i in ASK_ORDER:
        animal, code = facts[i]
        responses = list(session.send(question(animal)))
        answer = "".join(r.text for r in responses)
        turns.append({"fact": i, "depth": DEPTHS[i], "answer": answer,
                      "correct": code in answer, "ttft_s": responses[0].prefill_s,
                      "prompt_tokens": responses[0].prompt_tokens})
        log(f"  {policy} {animal} (depth {DEPTHS[i]}): {'ok' if code in answer else 'miss'} "
            f"{answer.strip()[:30]!r}, first token {responses[0].prefill_s:.2f} s")
    session.max_tokens = 48
    open_answer = "".join(r.text for r in session.send(OPEN_QUESTION))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "session.safetensors"
        start = time.perf_counter()
        session.save(path)
        save_s = time.perf_counter() - start
        start = time.perf_counter()
        ChatSession.load(path, model, tokenizer)
        load_s = time.perf_counter() - start
        file_bytes = path.stat().st_size
    return session, {"policy": policy, "args": args, "document_tokens": doc_tokens,
                     "read_s": read_s, "turns": turns, "open_answer": open_answer,
                     "accuracy": sum(t["correct"] for t in turns) / len(turns),
                     "kv_bytes": session.stats()["kv_bytes"], "session_bytes": file_bytes,
                     "save_s": save_s, "load_s": load_s}


def reread_ttft(model, tokenizer, full_session, turn: int) -> float:
    """Time to first token of question `turn` (0-based) for a chat that keeps
    no cache: the whole conversation up to it is read again."""
    history = full_session.messages[: 2 + 2 * turn]  # system + document, then Q/A pairs
    fresh = ChatSession(model, tokenizer, "full", SYSTEM, max_tokens=1)
    fresh.messages = [dict(m) for m in history]
    animal = ANIMALS[ASK_ORDER[turn]]
    return next(iter(fresh.send(question(animal)))).prefill_s


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--doc-tokens", type=int, default=None)
    parser.add_argument("--policies", default=None,
                        help="comma-separated (full always runs first)")
    parser.add_argument("--reread", default=None,
                        help="turns (0-based) at which re-reading the conversation is timed "
                        "(default: the second and the last)")
    parser.add_argument("--add", action="store_true",
                        help="run only --policies and add them to the existing result, whose "
                        "full run (its answers, the reference) is kept")
    args = parser.parse_args()
    quick = args.quick
    doc_tokens = args.doc_tokens or (2000 if quick else 6000)
    log = lambda line: print(line, flush=True)  # noqa: E731
    model, tokenizer = load(args.model)
    document, facts = planted_document(tokenizer, doc_tokens)
    names = (args.policies.split(",") if args.policies else
             ["streaming", "snapkv", "refreshkv"] if quick else
             ["streaming", "snapkv", "h2o", "refreshkv", "mixed"])
    policies = [(p, {"budget_ratio": 1 / 8}) for p in names if p != "full"]
    reread_turns = ([int(t) for t in args.reread.split(",")] if args.reread
                    else [1, len(ASK_ORDER) - 1])
    name = "multi_turn_quick" if quick else "multi_turn"
    report = {"benchmark": "multi_turn", "model": model.source, "quick": quick,
              "document_tokens": doc_tokens, "text": Path(TEXT).name, "results": []}
    reference = None  # full's answer to the open question
    if args.add:
        report = load_result(name)
        if report is None or report["model"] != model.source or (
                report["document_tokens"] != doc_tokens):
            raise SystemExit(f"--add: no {name}.json of this model and document length")
        earlier = report.pop("provenance")
        report.setdefault("added_to", {"policies": [r["policy"] for r in report["results"]],
                                       "provenance": earlier})
        reference = report["results"][0]["open_answer"]
    else:
        policies.insert(0, ("full", {}))
    reader = None
    for policy, policy_args in policies:
        shared = reads_prompts_in_full(policy, policy_args)
        if shared:
            if reader is None:
                reader, shared_read_s, shared_tokens = read(model, tokenizer, "full", {},
                                                            document, 24)
                log(f"document: {shared_tokens} tokens read in {shared_read_s:.0f} s")
            session, read_s, read_tokens = (reader.fork(policy, **policy_args), shared_read_s,
                                            shared_tokens)
        else:
            session, read_s, read_tokens = read(model, tokenizer, policy, policy_args,
                                                document, 24)
            log(f"  {policy}: read the document itself in {read_s:.0f} s")
        session, result = run_policy(session, facts, read_s, read_tokens, log)
        result["read_by"] = "the shared full reading" if shared else "itself"
        if policy == "full":
            reference = result["open_answer"]
            result["reread_ttft_s"] = {t: reread_ttft(model, tokenizer, session, t)
                                       for t in reread_turns}
            log(f"  full, re-reading the conversation: {result['reread_ttft_s']}")
        result["open_rouge_l"] = rouge_l(tokenizer.encode(result["open_answer"]),
                                         tokenizer.encode(reference))
        report["results"].append(result)
        write_result(name, report)


if __name__ == "__main__":
    from mlx_kvcache.process import exit_now

    main()
    exit_now(0)
