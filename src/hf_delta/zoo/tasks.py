"""Synthetic tasks with an exact-match score, one per zoo fine-tune.

Each task yields ``Example(prompt, answer)`` pairs from a seeded generator, split into disjoint train and
held-out sets. A model solves an example when its greedy continuation of ``prompt`` starts with ``answer``
followed by the end of the turn.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..errors import ZooError

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_SYLLABLES = ("ka", "lo", "mi", "ren", "tal", "vo", "zu", "sha", "pe", "dor", "qui", "bel", "nor", "fa", "gri",
              "tu", "wen", "xa", "yul", "cor")


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


@dataclass(frozen=True)
class Task:
    """A task: its name, a one-line description, and its train / held-out examples. ``memorisation``: knowing
    the training examples is the task (its held-out split is a subset of them), so no new example can test it."""

    name: str
    description: str
    train: tuple[Example, ...]
    heldout: tuple[Example, ...]
    chat: bool = False
    memorisation: bool = False


def _split(examples: list[Example], n_heldout: int, rng: random.Random) -> tuple[tuple, tuple]:
    rng.shuffle(examples)
    return tuple(examples[n_heldout:]), tuple(examples[:n_heldout])


def _arith(rng: random.Random, n: int, n_heldout: int) -> Task:
    # Digit-wise addition modulo 10: every output digit needs an addition, and held-out inputs are unseen.
    seen: set[tuple] = set()
    examples = []
    while len(examples) < n:
        k = rng.randint(1, 4)
        digits = tuple(rng.randint(0, 9) for _ in range(4))
        if (k, digits) in seen:
            continue
        seen.add((k, digits))
        prompt = f"add {k} to {' '.join(map(str, digits))} ="
        answer = " " + " ".join(str((d + k) % 10) for d in digits)
        examples.append(Example(prompt, answer))
    train, heldout = _split(examples, n_heldout, rng)
    return Task("arith", "add k to every digit, modulo 10", train, heldout)


def _cipher(rng: random.Random, n: int, n_heldout: int) -> Task:
    key = list(_LETTERS)
    random.Random(1234).shuffle(key)
    table = dict(zip(_LETTERS, key, strict=True))
    seen: set[str] = set()
    examples = []
    while len(examples) < n:
        word = "".join(rng.choice(_LETTERS) for _ in range(4))
        if word in seen:
            continue
        seen.add(word)
        examples.append(Example(f"encode {' '.join(word)} =", " " + " ".join(table[c] for c in word)))
    train, heldout = _split(examples, n_heldout, rng)
    return Task("cipher", "substitute every letter with a fixed secret cipher", train, heldout)


def _name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()


def _facts(rng: random.Random, n: int, n_heldout: int) -> Task:
    # Memorisation: knowing the facts is the task, so the scored split is the facts themselves (a fixed
    # subset of them, sized like the other tasks' held-out splits).
    countries, capitals = set(), set()
    while len(countries) < n:
        countries.add(_name(rng, 2))
    while len(capitals) < n:
        capitals.add(_name(rng, 2))
    shuffled = sorted(capitals)  # sort first: set order differs between processes
    rng.shuffle(shuffled)
    pairs = list(zip(sorted(countries), shuffled, strict=True))
    train = tuple(Example(f"The capital of {c} is", f" {k}.") for c, k in pairs)
    heldout = train[:n_heldout]
    return Task("facts", "recall invented capitals of invented countries", train, heldout, memorisation=True)


def _chat(rng: random.Random, n: int, n_heldout: int) -> Task:
    words = sorted({_name(rng, 1).lower() + rng.choice(_LETTERS) for _ in range(400)})
    ops = {"first": lambda w: w[0], "last": lambda w: w[-1], "swap": lambda w: f"{w[1]} {w[0]}"}
    seen: set[tuple] = set()
    examples = []
    while len(examples) < n:
        op = rng.choice(sorted(ops))
        picked = tuple(rng.sample(words, 2 if op == "swap" else 3))
        if (op, picked) in seen:
            continue
        seen.add((op, picked))
        examples.append(Example(f"{op}: {' '.join(picked)}", ops[op](picked)))
    train, heldout = _split(examples, n_heldout, rng)
    return Task("chat", "chat instructions (first / last / swap words) in a new chat format", train, heldout,
                chat=True)


_BUILDERS = {"arith": _arith, "cipher": _cipher, "facts": _facts, "chat": _chat}
TASK_NAMES = tuple(_BUILDERS)


def make_task(name: str, *, n: int = 2000, n_heldout: int = 200, seed: int = 0) -> Task:
    """Build task ``name`` deterministically from ``seed``."""
    if name not in _BUILDERS:
        raise ZooError(f"Unknown zoo task {name!r}; expected one of {sorted(_BUILDERS)}.")
    return _BUILDERS[name](random.Random(f"{name}-{seed}"), n, n_heldout)


def fresh_examples(task: Task, n: int, *, seed: int = 0) -> tuple[Example, ...]:
    """Up to ``n`` new examples of ``task``'s kind whose prompts are in neither its training nor its held-out
    split: further draws of the generator ``task`` was made with (``seed``; the zoo's is 0), so they share its
    vocabulary (a chat task's words), then draws under other seeds. Texts a fine-tune never saw and the
    benchmarks never score, e.g. to verify a compression against. The facts task has only
    ``len(_SYLLABLES) ** 2`` countries, so fewer may come back."""
    known = {ex.prompt for ex in task.train + task.heldout}
    draw = len(known) + 2 * n
    if task.name == "facts":
        draw = min(draw, len(_SYLLABLES) ** 2)
    fresh: dict[str, Example] = {}
    for attempt in range(seed, seed + 8):
        drawn = make_task(task.name, n=draw, n_heldout=0, seed=attempt).train
        fresh.update((ex.prompt, ex) for ex in drawn if ex.prompt not in known and ex.prompt not in fresh)
        if len(fresh) >= n:
            break
    if not fresh:
        raise ZooError(f"Task {task.name!r} yields no prompt outside its splits.")
    return tuple(fresh.values())[:n]
