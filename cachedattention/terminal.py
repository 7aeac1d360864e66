"""Terminal front ends: `generate` (one prompt), `chat` (interactive) and `demo` (scripted multi-turn chat)."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from dataclasses import replace

from cachedattention.cli import engine_config, sampling_flags_given
from cachedattention.interrupts import StepInterrupted
from cachedattention.llm import LLM
from cachedattention.outputs import RequestOutput
from cachedattention.sampling import SamplingParams

DEMO_TURNS = [  # answered coherently by the 135M model under greedy decoding (some topics make it loop)
    "Can you explain what a black hole is?",
    "How do scientists detect them?",
    "Could Earth ever fall into one?",
    "Summarise our conversation in one sentence.",
]


def _llm(args: argparse.Namespace) -> LLM:
    from cachedattention.model.embedded import embedded_model_converted

    config = engine_config(args)
    if config.model is None and not embedded_model_converted():  # (else half a minute of silence)
        print("first run: converting the embedded model (once, about half a minute)...", file=sys.stderr, flush=True)
    return LLM.from_config(config)


def turn_line(out: RequestOutput) -> str:
    m = out.metrics
    decode_s = (m.finish_s or 0) - (m.first_token_s or 0)
    tps = (m.generated_tokens - 1) / decode_s if decode_s > 0 and m.generated_tokens > 1 else 0.0
    reused = ", ".join(f"{t} {n}" for t, n in m.cached_tokens.items() if n) or "none"
    trunc = f", truncated {m.truncated_tokens}" if m.truncated_tokens else ""
    return (
        f"[TTFT {m.ttft_s * 1000:.0f} ms | {tps:.1f} tok/s | prompt {m.prompt_tokens} tok, "
        f"reused {m.num_cached_tokens} ({reused}){trunc}]"
    )


def sampling_params(args: argparse.Namespace, llm: LLM) -> SamplingParams:
    """The flags of `cli.add_sampling_args` given, over the model's generation config (as vLLM's),
    over the terminal's own defaults: greedy, and the command's answer length."""
    own = {"temperature": 0.0, "max_tokens": args.cli_max_tokens}
    return SamplingParams(**{**own, **llm.engine.sampling_defaults, **sampling_flags_given(args)})


def run_generate(args: argparse.Namespace) -> int:
    llm = _llm(args)
    params = sampling_params(args, llm)
    if args.chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)[0]
    else:
        out = llm.generate(args.prompt, params, use_tqdm=False)[0]
    print(out.text)
    print(turn_line(out), file=sys.stderr)
    llm.close()
    return 0


def run_chat(args: argparse.Namespace) -> int:
    """A conversation in the terminal. A turn that fails (a line the tokenizer refuses, a prompt past
    the window) or is stopped with Ctrl-C is reported and left out of the conversation, which goes
    on; Ctrl-C or Ctrl-D at the prompt ends it."""
    llm = _llm(args)
    params = sampling_params(args, llm)
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    print(f"chat: type a message; {CHAT_HELP}", file=sys.stderr)
    try:
        while True:
            line = _read_line()
            if line is None or line in ("/exit", "/quit"):
                break
            if line == "/reset":
                messages = list(start)
                print("[a new conversation]", file=sys.stderr)
            elif line == "/help":
                print(CHAT_HELP, file=sys.stderr)
            elif line and not _chat_turn(llm, messages, line, params, args.session_id):
                break
    finally:
        llm.close()
    return 0


CHAT_HELP = ("/reset starts a new conversation, /help shows this; /exit (or /quit), Ctrl-D or Ctrl-C ends; "
             "Ctrl-C during an answer stops it (twice: ends the chat)")  # fmt: skip


def _read_line() -> str | None:
    """The user's next line, stripped (empty for one that cannot be read); None at the end."""
    try:
        return input("you> ").strip()
    except (EOFError, KeyboardInterrupt):
        print(file=sys.stderr)
        return None
    except UnicodeDecodeError as e:  # (bytes that are not the terminal's encoding)
        print(f"error: that line is not valid text ({e.reason}); type it again", file=sys.stderr)
        return ""


def _chat_turn(llm: LLM, messages: list[dict[str, str]], line: str, params: SamplingParams,
               session_id: str | None) -> bool:  # fmt: skip
    """One turn: answered and kept in `messages`, or reported and left out. False when the chat
    must end: a second Ctrl-C stopped an engine step midway, which may have left it half updated."""
    left_out = "that message is left out of the conversation"
    try:
        out = llm.chat([*messages, {"role": "user", "content": line}], params, session_id=session_id, use_tqdm=False)[0]
    except StepInterrupted:
        print("\n[stopped in the middle of a step: the chat ends]", file=sys.stderr)
        return False
    except KeyboardInterrupt:
        print(f"\n[answer stopped: {left_out}]", file=sys.stderr)
        return True
    except ValueError as e:
        print(f"error: {e} ({left_out})", file=sys.stderr)
        return True
    if out.finish_reason == "error":  # (the engine failed this request alone: logged)
        print(f"error: the answer failed ({left_out})", file=sys.stderr)
        return True
    messages += [{"role": "user", "content": line}, {"role": "assistant", "content": out.text}]
    print(f"bot> {out.text}\n{turn_line(out)}", flush=True)
    return True


def run_demo(args: argparse.Namespace) -> int:
    """The same conversation on CachedAttention and on a recompute-every-turn engine, side by side."""
    own_dir = None if args.store_dir else tempfile.mkdtemp(prefix="cachedattention-demo-")
    store_dir = args.store_dir or own_dir
    try:
        _play_demo(argparse.Namespace(**{**vars(args), "store_dir": store_dir, "no_store": False}))
    finally:
        if own_dir is not None:  # a store the demo made for itself goes with it; --store-dir stays
            shutil.rmtree(own_dir, ignore_errors=True)
    return 0


def _play_demo(args: argparse.Namespace) -> None:
    store_dir = args.store_dir
    cached = _llm(args)
    cfg = engine_config(args)
    # the baseline recomputes everything: no store and no device prefix cache
    plain = replace(cfg, store=replace(cfg.store, enable=False), cache=replace(cfg.cache, enable_prefix_cache=False))
    base = LLM.from_config(plain, loaded=cached.engine.loaded)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    messages: list[dict[str, str]] = []
    truncated = False  # whether the store has cut this conversation yet
    print(f"CachedAttention demo on {cached.engine.loaded.name} ({args.device}, {cached.config.dtype}); store in {store_dir}\n")
    for i, user in enumerate(DEMO_TURNS, 1):
        messages.append({"role": "user", "content": user})
        out = cached.chat(messages, params, session_id="demo", use_tqdm=False)[0]
        cached.engine.store.store.flush()  # so the next turn's lookup sees this turn's segment
        # recompute what the model attended to: the conversation, or what truncation kept of it (a
        # window too small for the whole conversation: --max-model-len)
        ref = base.generate([{"prompt_token_ids": out.prompt_token_ids}], params, use_tqdm=False)[0]
        truncated = truncated or out.metrics.truncated_tokens > 0
        if out.token_ids == ref.token_ids:
            same = "same tokens as recompute"
        elif truncated:  # reuse keeps the history's KV as computed with the dropped turns before it
            same = "not recompute's tokens, as truncation may give: the kept history's KV was computed before the cut"
        else:
            same = "DIFFERENT from recompute"
        print(f"turn {i} you> {user}\nturn {i} bot> {out.text.strip()}")
        print(f"  CachedAttention {turn_line(out)}")
        print(f"  recompute       {turn_line(ref)}")
        print(f"  TTFT ratio {out.metrics.ttft_s / ref.metrics.ttft_s:.2f}x, {same}\n")
        messages.append({"role": "assistant", "content": out.text})
    print("store:", {k: v for k, v in cached.stats().items() if k.startswith(("store_", "host_", "disk_"))})
    cached.close()
