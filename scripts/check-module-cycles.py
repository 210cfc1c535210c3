#!/usr/bin/env python3
"""Fails when modules of a crate import each other in a cycle.

For every crate source tree given (a directory holding lib.rs or main.rs), each .rs file
is one module. An edge A -> B is drawn for every path A names that starts with `crate::`,
`super::` or `self::` (in `use` items and in expressions), resolved to the deepest module
file that exists. `mod x;` declarations are not edges. Test modules (`#[cfg(test)]` to the
end of the file, by the usual layout) are ignored. Prints every cycle found; exit 1 if any.
"""
import os
import re
import sys

PATH_RE = re.compile(r"\b(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
GROUP_RE = re.compile(r"\b(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)*)::\{([^;]*?)\};", re.S)


def module_of(root, path):
    rel = os.path.relpath(path, root)[:-3].split(os.sep)
    if rel[-1] in ("mod", "lib", "main"):
        rel = rel[:-1]
    return tuple(rel)


def strip_tests_and_comments(text):
    cut = re.search(r"^#\[cfg\(test\)\]\s*\n\s*mod\s+\w+\s*\{", text, re.M)
    if cut:
        text = text[: cut.start()]
    text = re.sub(r"//[^\n]*", "", text)
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def expand_groups(text):
    """Turns `use a::{b, c::d};` into `use a::b; use a::c::d;` (one level of nesting)."""
    def repl(m):
        head = m.group(1) + m.group(2)
        out = []
        for part in split_top(m.group(3)):
            part = part.strip()
            if not part or part == "self":
                out.append(f"use {head};")
            elif "{" in part:
                inner = part[: part.index("{")].rstrip(":")
                for p in split_top(part[part.index("{") + 1 : part.rindex("}")]):
                    if p.strip():
                        out.append(f"use {head}::{inner}::{p.strip()};")
            else:
                out.append(f"use {head}::{part};")
        return " ".join(out)
    return GROUP_RE.sub(repl, text)


def split_top(s):
    depth, cur, parts = 0, "", []
    for ch in s:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


def resolve(mod, kind, segs, modules):
    if kind == "crate":
        base = []
    elif kind == "super":
        base = list(mod[:-1])
    else:
        base = list(mod)
    while segs and segs[0] == "super":
        base = base[:-1]
        segs = segs[1:]
    full = base + segs
    for n in range(len(full), -1, -1):
        if tuple(full[:n]) in modules:
            return tuple(full[:n])
    return ()


def edges_of(root):
    files = []
    for d, _, fs in os.walk(root):
        files += [os.path.join(d, f) for f in fs if f.endswith(".rs")]
    modules = {module_of(root, f): f for f in files}
    graph = {m: set() for m in modules}
    for m, f in modules.items():
        with open(f, encoding="utf-8") as fh:
            text = expand_groups(strip_tests_and_comments(fh.read()))
        for kind, rest in PATH_RE.findall(text):
            segs = [s for s in rest.split("::") if s]
            target = resolve(m, kind, segs, modules)
            if target != m:
                graph[m].add(target)
    return graph


def cycles(graph):
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            strong(v)
    return out


def name(m):
    return "::".join(m) or "crate"


def main(roots):
    bad = 0
    for root in roots:
        graph = edges_of(root)
        for comp in cycles(graph):
            bad += 1
            members = sorted(name(m) for m in comp)
            print(f"{root}: import cycle between modules: {', '.join(members)}")
            for m in sorted(comp):
                for t in sorted(graph[m] & set(comp)):
                    print(f"    {name(m)} -> {name(t)}")
    if bad:
        return 1
    print(f"module cycles: none in {len(roots)} crate(s)")
    return 0


def self_test():
    """The checker must find a planted cycle and accept its removal."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        files = {
            "lib.rs": "pub mod a;\npub mod b;\npub mod c;\n",
            "a.rs": "use crate::b::{B, other::{X}};\n",
            "b.rs": "use super::c::C;\n#[cfg(test)]\nmod tests {\n    use crate::a::A;\n}\n",
            "c.rs": "fn f() { crate::a::g() }\n",
        }
        for name, text in files.items():
            with open(os.path.join(d, name), "w", encoding="utf-8") as f:
                f.write(text)
        found = cycles(edges_of(d))
        assert [sorted(c) for c in found] == [[("a",), ("b",), ("c",)]], found
        with open(os.path.join(d, "c.rs"), "w", encoding="utf-8") as f:
            f.write("// crate::a::g() in a comment is no edge\n")
        assert cycles(edges_of(d)) == [], "no cycle once c no longer names a"
    print("check-module-cycles self-test: ok")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--self-test"]:
        sys.exit(self_test())
    sys.exit(main(sys.argv[1:]))
