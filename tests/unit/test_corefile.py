"""Adding our import line to a cluster's Corefile: once, in the right block, nothing else touched.

Why these cases: the editor must read a Corefile exactly as CoreDNS does, or it writes one CoreDNS
refuses while reporting success. CoreDNS ends lines only at "\\n" (the other separators Python's
str.splitlines splits on are whitespace or word characters to it), and a brace inside a quoted
word or a comment is no brace. The tokenizer table below was checked against the Go lexer of
the CoreDNS the dev stack runs.

Every Corefile ``ensure_import`` edits here (CASES, the fixtures and the generated ones) is valid
and runnable: ``{$DNS_PORT}`` and ``{$KUBECONFIG}`` are CoreDNS environment placeholders, and
tests/integration/test_corefile_coredns.py loads each edited Corefile in the real CoreDNS
binary with the dev stack's API server.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dns.corefile import RELOAD_LINE, CorefileCheck, check, ensure_import, tokenize

IMPORT = "import /etc/coredns/egress-gateways/*.override"
DOMAIN = "cluster.local"

# The line separators str.splitlines splits on but CoreDNS does not.
SEPARATORS = ["\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]

KUBEADM = """\
.:{$DNS_PORT} {
    bind 127.0.0.1
    errors
    health 127.0.0.1:0 {
       lameduck 5s
    }
    ready 127.0.0.1:0
    kubernetes cluster.local in-addr.arpa ip6.arpa {
       kubeconfig {$KUBECONFIG}
       pods insecure
       fallthrough in-addr.arpa ip6.arpa
       ttl 30
    }
    prometheus 127.0.0.1:0
    forward . 127.0.0.1:9 {
       max_concurrent 1000
    }
    cache 30
    loop
    reload
    loadbalance
}
"""

WITH_COMMENTS_NO_RELOAD = """\
# Our cluster DNS. Keep this comment.
example.org:{$DNS_PORT} {
    bind 127.0.0.1
    forward . 127.0.0.1:9  # corporate resolver
}
.:{$DNS_PORT} {
    bind 127.0.0.1
    errors
    kubernetes cluster.local {   # cluster names
        kubeconfig {$KUBECONFIG}
    }
    forward . 127.0.0.1:9
}
"""

# The head of a cluster block; cases append directives and the closing brace.
HEAD = """\
.:{$DNS_PORT} {
    bind 127.0.0.1
    kubernetes cluster.local {
        kubeconfig {$KUBECONFIG}
    }
"""


@dataclass(frozen=True)
class Case:
    text: str
    at: int  # where the lines go: the start of the cluster block's closing line, or the end
    has_import: bool
    has_reload: bool


def case(
    text: str, at: int | None = None, *, has_import: bool = False, has_reload: bool = False
) -> Case:
    """By default the cluster block closes on the file's last line and lacks both lines."""
    if at is None:
        at = text.rfind("\n", 0, len(text.rstrip("\n"))) + 1
    return Case(text, at, has_import, has_reload)


BRACELESS = HEAD.replace(" {\n", "\n", 1)  # a block without braces runs to the end of the file

# Every Corefile the unit tests edit (with the generated ones below).
CASES: dict[str, Case] = {
    "kubeadm": case(KUBEADM, has_reload=True),
    "comments and another block": case(WITH_COMMENTS_NO_RELOAD),
    **{
        f"separator {ord(sep):#04x} in a comment": case(
            HEAD + f"    errors # note{sep}reload 2s{sep}}}\n}}\n"
        )
        for sep in SEPARATORS
    },
    **{
        f"separator {ord(sep):#04x} in a quoted argument": case(
            HEAD + f'    log . "{{remote}}{sep}}}{sep}reload 2s"\n}}\n'
        )
        for sep in SEPARATORS
    },
    **{
        f"separator {ord(sep):#04x} between words": case(HEAD + f"    cache{sep}30\n}}\n")
        for sep in ["\v", "\f", "\x85", "\u2028", "\u2029"]  # whitespace to CoreDNS (Go)
    },
    "quoted braces in a template block": case(
        HEAD
        + "    template IN A example.org {\n"
        + '        answer "{{ .Name }} 60 IN A 192.0.2.1"\n'
        + "    }\n"
        + '    template IN TXT example.org { answer "{{ .Name }} 60 IN TXT \\"}\\"" }\n'
        + "}\n"
    ),
    "a } inside a quoted string on the last line": case(HEAD + '    log . "{remote} }"\n}'),
    "a quoted string over two lines, its second one a }": case(
        HEAD + '    log . "{remote}\n}"\n}\n'
    ),
    "a # inside a word drops the rest of that word only": case(HEAD + "    cache 30#s}\n}\n"),
    "CRLF line endings": case(KUBEADM.replace("\n", "\r\n"), has_reload=True),
    "CRLF line endings, no reload": case(WITH_COMMENTS_NO_RELOAD.replace("\n", "\r\n")),
    "byte order mark and no final newline": case("\ufeff" + KUBEADM.rstrip("\n"), has_reload=True),
    "odd whitespace before the closing brace": case(HEAD + "    errors\n \u2028\v}  # end\n"),
    "reload in a snippet": case(
        "(common) {\n    reload 2s\n}\n" + HEAD.replace("\n", "\n    import common\n", 1) + "}\n",
        has_reload=True,
    ),
    "import already there": case(HEAD + f"    {IMPORT}\n}}\n", has_import=True),
    "zones from the server block key": case(
        "cluster.local:{$DNS_PORT} {\n    bind 127.0.0.1\n"
        "    kubernetes {\n        kubeconfig {$KUBECONFIG}\n    }\n}\n"
    ),
    "cluster block first, then another": case(
        HEAD + "}\nexample.org:{$DNS_PORT} {\n    bind 127.0.0.1\n    errors\n}\n",
        at=len(HEAD),
    ),
    "a block without braces": case(BRACELESS, at=len(BRACELESS)),
}


def inserted(before: Case, after: str) -> str:
    """What ensure_import added, asserting every other character is where it was."""
    tail = len(before.text) - before.at
    assert after[: before.at] == before.text[: before.at]
    assert after[len(after) - tail :] == before.text[before.at :]
    return after[before.at : len(after) - tail]


@pytest.mark.parametrize("name", sorted(CASES))
def test_inserts_only_the_missing_lines_before_the_block_closes(name: str) -> None:
    c = CASES[name]
    assert check(c.text, IMPORT, DOMAIN) == CorefileCheck(c.has_import, c.has_reload, True)
    out = ensure_import(c.text, IMPORT, DOMAIN)
    added = inserted(c, out)
    newline = "\r\n" if "\r\n" in c.text else "\n"
    missing = ((IMPORT, c.has_import), (RELOAD_LINE, c.has_reload))
    assert [line.lstrip(" \t") for line in added.splitlines(keepends=True)] == [
        line + newline for line, has in missing if not has
    ]
    assert check(out, IMPORT, DOMAIN).ok
    assert ensure_import(out, IMPORT, DOMAIN) == out


def test_adds_the_import_line_once_before_the_block_closes() -> None:
    out = ensure_import(KUBEADM, IMPORT, DOMAIN)
    assert out.count(IMPORT) == 1
    assert out.replace(f"    {IMPORT}\n", "") == KUBEADM
    assert out.splitlines()[-2] == f"    {IMPORT}"
    assert ensure_import(out, IMPORT, DOMAIN) == out
    assert check(out, IMPORT, DOMAIN).ok


def test_adds_reload_when_missing_and_keeps_comments_and_other_blocks() -> None:
    out = ensure_import(WITH_COMMENTS_NO_RELOAD, IMPORT, DOMAIN)
    assert out.startswith(
        "# Our cluster DNS. Keep this comment.\nexample.org:{$DNS_PORT} {\n    bind 127.0.0.1\n"
        "    forward . 127.0.0.1:9  # corporate resolver\n}"
    )
    tail = out.split(".:{$DNS_PORT} {", 1)[1]
    assert f"    {IMPORT}\n    reload 2s\n}}" in tail
    assert "reload" not in out.split(".:{$DNS_PORT} {", 1)[0]
    assert ensure_import(out, IMPORT, DOMAIN) == out


def test_check_reports_what_is_missing() -> None:
    state = check(WITH_COMMENTS_NO_RELOAD, IMPORT, DOMAIN)
    assert state.server_block_found and not state.has_import and not state.has_reload
    assert check(KUBEADM, IMPORT, DOMAIN).has_reload


def test_commented_out_import_does_not_count() -> None:
    text = KUBEADM.replace("    reload\n", f"    reload\n    # {IMPORT}\n")
    assert not check(text, IMPORT, DOMAIN).has_import


@pytest.mark.parametrize("sep", SEPARATORS)
def test_a_separator_ends_no_comment_and_no_quoted_word(sep: str) -> None:
    """Python would see a line "reload 2s" and one "}" here; CoreDNS sees neither."""
    in_comment = CASES[f"separator {ord(sep):#04x} in a comment"].text
    assert in_comment == HEAD + f"    errors # note{sep}reload 2s{sep}}}\n}}\n"
    assert not check(in_comment, IMPORT, DOMAIN).has_reload
    assert ensure_import(in_comment, IMPORT, DOMAIN) == (
        HEAD + f"    errors # note{sep}reload 2s{sep}}}\n    {IMPORT}\n    reload 2s\n}}\n"
    )
    quoted = CASES[f"separator {ord(sep):#04x} in a quoted argument"].text
    assert quoted == HEAD + f'    log . "{{remote}}{sep}}}{sep}reload 2s"\n}}\n'
    assert ensure_import(quoted, IMPORT, DOMAIN) == (
        HEAD + f'    log . "{{remote}}{sep}}}{sep}reload 2s"\n    {IMPORT}\n    reload 2s\n}}\n'
    )


def test_quoted_braces_in_a_template_block_are_words() -> None:
    text = CASES["quoted braces in a template block"].text
    one_line = '    template IN TXT example.org { answer "{{ .Name }} 60 IN TXT \\"}\\"" }\n'
    assert text.endswith(one_line + "}\n")
    assert ensure_import(text, IMPORT, DOMAIN) == (
        text.removesuffix("}\n") + f"    {IMPORT}\n    reload 2s\n}}\n"
    )


def test_a_closing_brace_in_a_quoted_string_on_the_last_line_is_no_brace() -> None:
    text = CASES["a } inside a quoted string on the last line"].text
    assert text == HEAD + '    log . "{remote} }"\n}'
    assert ensure_import(text, IMPORT, DOMAIN) == (
        HEAD + f'    log . "{{remote}} }}"\n    {IMPORT}\n    reload 2s\n}}'
    )


def test_crlf_lines_get_crlf_lines() -> None:
    out = ensure_import(CASES["CRLF line endings, no reload"].text, IMPORT, DOMAIN)
    assert out.endswith(f"    forward . 127.0.0.1:9\r\n    {IMPORT}\r\n    reload 2s\r\n}}\r\n")


def test_a_block_without_braces_gets_the_lines_at_the_end() -> None:
    assert ensure_import(BRACELESS, IMPORT, DOMAIN) == BRACELESS + f"    {IMPORT}\n    reload 2s\n"


def test_reload_and_import_count_only_as_directives_of_the_cluster_block() -> None:
    nested = HEAD.replace(
        "        kubeconfig", f"        reload\n        {IMPORT}\n        kubeconfig"
    )
    state = check(nested + "}\n", IMPORT, DOMAIN)
    assert state.server_block_found and not state.has_reload and not state.has_import
    other_block = "example.org:{$DNS_PORT} {\n    reload\n    " + IMPORT + "\n}\n" + HEAD + "}\n"
    state = check(other_block, IMPORT, DOMAIN)
    assert not state.has_reload and not state.has_import
    assert check(HEAD + f"    reload 5s\n    {IMPORT}\n}}\n", IMPORT, DOMAIN).ok


def test_no_block_for_the_cluster_domain_is_an_error_not_a_guess() -> None:
    with pytest.raises(ValueError, match=r"corp\.internal"):
        ensure_import(KUBEADM, IMPORT, "corp.internal")
    only_in_a_comment = ".:{$DNS_PORT} {\n    # kubernetes cluster.local\n    errors\n}\n"
    with pytest.raises(ValueError, match=r"no server block"):
        ensure_import(only_in_a_comment, IMPORT, DOMAIN)
    assert not check(only_in_a_comment, IMPORT, DOMAIN).server_block_found
    other_domain = HEAD.replace("kubernetes cluster.local", "kubernetes corp.internal")
    quoted_name = other_domain + '    log . "kubernetes cluster.local"\n}\n'
    with pytest.raises(ValueError, match=r"no server block"):
        ensure_import(quoted_name, IMPORT, DOMAIN)


# Corefiles CoreDNS refuses (tests/integration/test_corefile_coredns.py checks that it does).
REFUSED = {
    "a quoted } is a brace to CoreDNS's parser": HEAD + '    errors "}"\n}\n',
    "U+2028 is no line break": HEAD + "    errors\u2028}\n}\n",
    "the comment inside a word ends at the space": HEAD + "    cache 30#s }\n}\n",
    "the server block is never closed": HEAD + "    template IN A {\n    }\n    errors\n",
}
# CoreDNS accepts a server block left open when the file ends with a plugin's "}", but any line
# added after that "}" makes the Corefile fail to parse.
LEFT_OPEN = HEAD + "    template IN A example.org {\n    }\n"


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_a_corefile_coredns_refuses_is_an_error_not_an_edit(name: str) -> None:
    with pytest.raises(ValueError, match="does not parse"):
        ensure_import(REFUSED[name], IMPORT, DOMAIN)
    assert not check(REFUSED[name], IMPORT, DOMAIN).server_block_found


def test_a_block_closed_only_by_its_last_plugin_is_not_edited() -> None:
    assert check(LEFT_OPEN, IMPORT, DOMAIN).server_block_found
    with pytest.raises(ValueError, match="never closed"):
        ensure_import(LEFT_OPEN, IMPORT, DOMAIN)


def test_an_import_line_that_is_not_one_directive_is_refused() -> None:
    with pytest.raises(ValueError, match="not one import directive"):
        ensure_import(KUBEADM, "import /a/*.override # x\nreload", DOMAIN)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        # Checked against caddyfile.lexer (github.com/coredns/caddy v1.1.4).
        ("a#b c", [("a", 1), ("c", 1)]),
        ("a#b}\nc", [("a", 1), ("c", 2)]),
        ('"a\\"b" "a\\b" "a\\\\" x', [('a"b', 1), ("a\\b", 1), ("a\\\\", 1), ("x", 1)]),
        ("x\x1cy a\u2028b", [("x\x1cy", 1), ("a", 1), ("b", 1)]),
        ('a\rb "c\rd"', [("ab", 1), ("c\rd", 1)]),
        ("\ufeffa \ufeffb", [("a", 1), ("\ufeffb", 1)]),
        (
            '"{{ .Name }}" "}" {$X} "a\nb" c',
            [("{{ .Name }}", 1), ("}", 1), ("{$X}", 1), ("a\nb", 1), ("c", 2)],
        ),
        ('""', [("", 1)]),
        ('"abc', [("abc", 1)]),
        ('a"b"c', [('a"b"c', 1)]),
    ],
)
def test_tokenize_reads_words_as_coredns_does(text: str, words: list[tuple[str, int]]) -> None:
    assert [(t.text, t.line) for t in tokenize(text)] == words


# -- generated Corefiles ----------------------------------------------------------------------

# Whitespace to CoreDNS (Go's unicode.IsSpace) that ends no line.
WORD_SPACE = [" ", "\t", "\v", "\f", "\x85", "\xa0", "\u2028", "\u2029", "\u3000"]
# What comments and quoted words hold.
ODD = [*SEPARATORS, "{", "}", "{{ .Name }}", "#", "x", " ", "\t", "é", "reload 2s", "import x"]


@dataclass(frozen=True)
class Sample:
    text: str
    at: int  # where our lines belong: the start of the cluster block's closing line
    indent: str  # of the block's directives
    newline: str  # ending the line before
    has_import: bool
    has_reload: bool


class _Writer:
    """Random pieces of a valid, runnable Corefile."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.parts: list[str] = []

    def text(self) -> str:
        return "".join(self.parts)

    def space(self) -> str:
        return self.rng.choice(WORD_SPACE) if self.rng.random() < 0.4 else " "

    def odd(self, k: int) -> str:
        return "".join(self.rng.choice(ODD) for _ in range(self.rng.randint(0, k)))

    def newline(self) -> str:
        return self.rng.choice(["\n", "\n", "\r\n"])

    def quoted(self) -> str:
        inner = "{remote}" + self.odd(5)
        if self.rng.random() < 0.2:
            inner += "\n}"  # a word over two lines
        return f'"{inner}"'

    def line(self, indent: str, body: str) -> None:
        tail = self.space() + "#" + self.odd(6) if self.rng.random() < 0.3 else ""
        self.parts.append(f"{indent}{body}{tail}{self.newline()}")

    def filler(self, indent: str) -> None:
        """Comment lines and lines of odd whitespace."""
        for _ in range(self.rng.randint(0, 2)):
            if self.rng.random() < 0.5:
                self.parts.append(f"{indent}#{self.odd(6)}{self.newline()}")
            else:
                blank = "".join(self.rng.choice(WORD_SPACE) for _ in range(self.rng.randint(0, 3)))
                self.parts.append(blank + self.newline())

    def other_block(self, zone: str) -> None:
        indent = self.rng.choice(["    ", "\t", "  "])
        self.line("", zone + ":{$DNS_PORT} {")
        self.line(indent, "bind 127.0.0.1")
        self.filler(indent)
        if self.rng.random() < 0.5:
            self.line(
                indent, f'template IN TXT {zone} {{ answer "{{{{ .Name }}}} 60 IN TXT \\"}}\\"" }}'
            )
        else:
            self.line(indent, f"log . {self.quoted()}")
        self.parts.append("}" + self.newline())


def sample_corefile(rng: random.Random) -> Sample:
    """A random valid Corefile (runnable with DNS_PORT and KUBECONFIG set), with the answer.

    It mixes what broke line-based editing: separators in comments, in quoted words and between
    words, braces in quoted words and comments, ``#`` inside words, words over two lines, CRLF,
    blocks around the cluster one, a snippet, odd indentation, no final newline.
    """
    w = _Writer(rng)
    snippet = rng.choice([None, "reload 2s", "loadbalance"])
    w.filler("")
    if snippet:
        w.parts.append(f"(common) {{{w.newline()}    {snippet}{w.newline()}}}{w.newline()}")
    if rng.random() < 0.5:
        w.other_block("example.org")

    key = rng.choice([".", "cluster.local"])
    zones = rng.choice(
        [" cluster.local", " cluster.local in-addr.arpa ip6.arpa", " CLUSTER.LOCAL."]
    )
    if key == "cluster.local" and rng.random() < 0.5:
        zones = ""  # the plugin serves the block's zones
    indent = rng.choice(["    ", "\t", "  ", ""])
    inner = indent + rng.choice(["    ", "\t"])
    has_import = rng.random() < 0.3
    has_reload = snippet == "reload 2s" or rng.random() < 0.3

    def kubernetes() -> None:
        w.line(indent, f"kubernetes{zones} {{")
        w.line(inner, "kubeconfig {$KUBECONFIG}")
        w.filler(inner)
        if rng.random() < 0.5:
            w.line(inner, "ttl 30")
        w.line(indent, "}")

    def template() -> None:
        w.line(indent, "template IN A example.org {")
        w.line(inner, 'answer "{{ .Name }} 60 IN A 192.0.2.1"')
        w.line(indent, "}")

    # "errors#..." is the word "errors": a "#" inside a word drops the rest of the word.
    dropped = "".join(c for c in w.odd(3) if c not in WORD_SPACE)
    directives = [
        lambda: w.line(indent, f"bind{w.space()}127.0.0.1"),
        kubernetes,
        lambda: w.line(indent, f"errors#{dropped}"),
        lambda: w.line(indent, f"cache{w.space()}30"),
        lambda: w.line(indent, f"log . {w.quoted()}"),
        lambda: w.line(indent, "forward . 127.0.0.1:9"),
        template,
    ]
    if has_import:
        directives.append(lambda: w.line(indent, IMPORT))
    if has_reload and snippet != "reload 2s":
        directives.append(lambda: w.line(indent, rng.choice(["reload", "reload 2s"])))
    if snippet:
        directives.append(lambda: w.line(indent, "import common"))
    rng.shuffle(directives)

    w.line("", key + ":{$DNS_PORT} {")
    for directive in directives:
        w.filler(indent)
        directive()
    w.filler(indent)
    before = w.text()
    closing = rng.choice(["", " ", "\t", "\v", "\u2028 "]) + "}"
    if rng.random() < 0.3:
        closing += w.space() + "#" + w.odd(6)
    w.parts.append(closing)
    if rng.random() < 0.5:
        w.parts.append(w.newline())
        w.other_block("example.net")
    elif rng.random() < 0.8:
        w.parts.append(w.newline())
    newline = "\r\n" if before.endswith("\r\n") else "\n"
    return Sample(w.text(), len(before), indent, newline, has_import, has_reload)


@settings(max_examples=100, deadline=None)
@given(st.randoms(use_true_random=False))
def test_generated_corefiles_gain_exactly_the_missing_lines(rng: random.Random) -> None:
    s = sample_corefile(rng)
    state = check(s.text, IMPORT, DOMAIN)
    assert (state.server_block_found, state.has_import, state.has_reload) == (
        True,
        s.has_import,
        s.has_reload,
    )
    out = ensure_import(s.text, IMPORT, DOMAIN)
    missing = ((IMPORT, s.has_import), (RELOAD_LINE, s.has_reload))
    added = "".join(f"{s.indent}{line}{s.newline}" for line, has in missing if not has)
    assert out == s.text[: s.at] + added + s.text[s.at :]
    assert ensure_import(out, IMPORT, DOMAIN) == out
    assert check(out, IMPORT, DOMAIN).ok
