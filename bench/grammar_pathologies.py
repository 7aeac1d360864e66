"""What a guided grammar costs on shapes that used to hang or copy whole stacks: nested repetitions
of the empty string, rules that double their readings at each level, eight nested optional
repetitions, a long chain of rules, deep nesting. Each case compiles the grammar and steps it
through a text it derives; a case past 60 s is stopped and shown as such.

    PYTHONPATH=. .venv/bin/python bench/grammar_pathologies.py [deep nesting, default 5000]
"""

import signal
import sys
import time

from cachedattention.engine.grammar import Grammar


def cases(depth: int) -> list[tuple[str, str, str]]:
    doubling = "\n".join(f't{i} ::= t{i + 1} t{i + 1} | ""' for i in range(40))
    chain = "\n".join(f'r{i} ::= r{i + 1} | "x"' for i in range(8000))
    return [
        ("repetitions of the empty string, three deep", 'root ::= (((""){0,1000}){0,1000}){0,1000} "z"', "z"),
        ("40 rules doubling their readings", f'root ::= t0 "z"\n{doubling}\nt40 ::= ""', "z"),
        ('eight nested ("a"){0,3}', "root ::= " + "(" * 8 + '"a"' + "){0,3}" * 8 + ' "z"', "aaaz"),
        ('eight nested ("a"?){0,1000}', "root ::= " + "(" * 8 + '"a"?' + "){0,1000}" * 8 + ' "z"', "aaaz"),
        ('forty nested ("a"?){0,1000}', "root ::= " + "(" * 40 + '"a"?' + "){0,1000}" * 40 + ' "z"', "aaz"),
        ("up to 1,000 lines", 'root ::= (line "\\n"?){0,1000} "END"\nline ::= [^\\n]*', "hello world\n" * 10 + "END"),
        ("an ambiguous grammar, 2,000 characters", 'root ::= e\ne ::= "a" e? "c"?', "a" * 2000),
        ("a chain of 8,000 rules", f"root ::= r0\n{chain}\nr8000 ::= \"y\"", "y"),
        (f"{depth} nested parentheses", 'root ::= "(" root ")" | "x"', "(" * depth + "x" + ")" * depth),
    ]


def run(grammar: str, text: str) -> str:
    start = time.perf_counter()
    g = Grammar(grammar)
    compiled = time.perf_counter()
    cursor = g.start
    for c in text:
        cursor = g.step_char(cursor, ord(c))
        if cursor is None:
            return f"compiled in {compiled - start:.2f} s; refused {text[:12]!r}… at a character it derives"
    taken = "taken whole" if g.matched(cursor) else "NOT taken whole"
    return f"compiled in {compiled - start:.2f} s, {len(text)} characters in {time.perf_counter() - compiled:.2f} s, {taken}"


def main() -> None:
    depth = int(sys.argv[1]) if len(sys.argv) > 1 else 5000

    def stop(*_):
        raise TimeoutError

    signal.signal(signal.SIGALRM, stop)
    for name, grammar, text in cases(depth):
        signal.alarm(60)
        try:
            print(f"{name}: {run(grammar, text)}", flush=True)
        except TimeoutError:
            print(f"{name}: stopped after 60 s", flush=True)
        finally:
            signal.alarm(0)


if __name__ == "__main__":
    main()
