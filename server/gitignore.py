"""`.gitignore` matching as the Hub's preupload applies it (`shouldIgnore`): git's pattern rules, compiled once.

Covered: comments and blank lines, `!` negation (the last matching pattern wins), a leading or inner `/`
anchoring a pattern to the repo root, a trailing `/` matching folders only, `*`, `?`, `[...]`, and `**`.
A file is ignored when it or a folder above it matches.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class _Rule:
    regex: re.Pattern
    negate: bool
    folders_only: bool


def _translate(pattern: str) -> str:
    out, i, n = [], 0, len(pattern)
    while i < n:
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2 :]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1 : end]
            body = "^" + body[1:] if body.startswith("!") else body
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end + 1
        elif pattern[i] == "\\" and i + 1 < n:
            out.append(re.escape(pattern[i + 1]))
            i += 2
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


class GitIgnore:
    def __init__(self, text: str):
        self.rules: list[_Rule] = []
        for line in text.splitlines()[:10_000]:  # a bound: a .gitignore is a few dozen lines
            line = line.rstrip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            line = line[1:] if negate else line
            line = line[1:] if line.startswith("\\") and line[1:2] in ("#", "!") else line
            folders_only = line.endswith("/")
            line = line.rstrip("/")
            if not line:
                continue
            anchored = "/" in line
            body = _translate(line.lstrip("/"))
            try:
                regex = re.compile(("" if anchored else "(?:.*/)?") + body, re.S)
            except re.error:  # a broken [...] class: git ignores the line too
                continue
            self.rules.append(_Rule(regex, negate, folders_only))

    def _verdict(self, candidate: str, is_folder: bool) -> bool:
        ignored = False
        for rule in self.rules:  # the last matching rule decides
            if (is_folder or not rule.folders_only) and rule.regex.fullmatch(candidate):
                ignored = not rule.negate
        return ignored

    def ignores(self, path: str) -> bool:
        """Whether `path` (a file, '/'-separated, relative to the repo root) is ignored."""
        parts = path.split("/")
        # an ignored folder hides its files (git cannot re-include a file below one)
        if any(self._verdict("/".join(parts[:d]), True) for d in range(1, len(parts))):
            return True
        return self._verdict(path, False)
