"""Add our ``import`` line (and ``reload 2s``) to a Corefile, once, touching nothing else.

The Corefile belongs to the cluster: we never rewrite it, only insert missing lines just before
the closing brace of the server block that serves the cluster domain, keeping every other byte.
Running it again changes nothing.

Why a tokenizer: reading the Corefile as Python lines and counting braces misreads valid
Corefiles, and a misread means writing one CoreDNS refuses while reporting success. CoreDNS
(its Caddy parser, github.com/coredns/caddy v1.1.4 ``caddyfile/lexer.go`` and ``parse.go``)
ends a line only at ``\\n``: U+2028, U+0085, ``\\v``, ``\\f`` and the other separators
``str.splitlines`` splits on are either plain whitespace inside a line or, like ``\\x1c``, part of
a word. A ``{`` or ``}`` is a brace only as a whole token (``"{{ .Name }}"`` is one word, but a
quoted ``"}"`` *is* a brace to CoreDNS too: the parser sees the unquoted text), and an unquoted
``#`` comments out the rest of the line at the start of a word but only the rest of the word
inside one. So this module mirrors that lexer rune for rune and the parser's block structure
(addresses, braces, directives, snippets, ``import``), decides from the words CoreDNS will see,
and parses its own output again before returning it: the edit must read as the old words plus
the new lines, or it is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

# CoreDNS's shortest reload interval (its default is 30 s ± 15 s). Checking costs one read and
# hash of the Corefile and the imported files; a change swaps the config in process.
RELOAD_LINE = "reload 2s"

# Go's unicode.IsSpace, which the Caddy lexer splits words on: Python's str.isspace() also
# counts U+001C..U+001F, which Go (and so CoreDNS) keeps inside a word.
_GO_SPACE = frozenset(
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
    "\u200a\u2028\u2029\u202f\u205f\u3000"
)
_BOM = "\ufeff"
# CoreDNS caps snippet expansions at 10000; a Corefile needing more is not one we edit.
_MAX_EXPANSIONS = 1000


@dataclass(frozen=True, slots=True)
class CorefileCheck:
    has_import: bool
    has_reload: bool
    server_block_found: bool

    @property
    def ok(self) -> bool:
        return self.has_import and self.has_reload


@dataclass(frozen=True, slots=True)
class Token:
    """One word as CoreDNS's lexer reads it."""

    text: str  # without enclosing quotes; ``\\"`` unescaped, other backslashes kept
    line: int  # 1-based line of its first character; lines end only at "\n"
    start: int  # offset of its first character (the opening quote when quoted)
    quoted: bool

    @property
    def last_line(self) -> int:
        """The line it ends on: CoreDNS counts the newlines inside a (quoted) word."""
        return self.line + self.text.count("\n")


def tokenize(corefile: str) -> list[Token]:
    """The words of a Corefile exactly as ``caddyfile.lexer.next`` produces them."""
    tokens: list[Token] = []
    n = len(corefile)
    i = 1 if corefile.startswith(_BOM) else 0  # the lexer drops one leading byte order mark
    line = 1
    while True:
        # One call of lexer.next(): its comment/quote state starts fresh for every word.
        val: list[str] = []
        comment = quoted = escaped = False
        start = tok_line = 0
        while True:
            if i >= n:
                if val:
                    tokens.append(Token("".join(val), tok_line, start, quoted))
                    break
                return tokens
            ch = corefile[i]
            i += 1
            if quoted:
                if not escaped:
                    if ch == "\\":
                        escaped = True
                        continue
                    if ch == '"':
                        tokens.append(Token("".join(val), tok_line, start, True))
                        break
                if ch == "\n":
                    line += 1
                if escaped and ch != '"':
                    val.append("\\")  # only quotes can be escaped
                val.append(ch)
                escaped = False
                continue
            if ch in _GO_SPACE:
                if ch == "\r":
                    continue  # dropped, even inside a word
                if ch == "\n":
                    line += 1
                    comment = False
                if val:
                    tokens.append(Token("".join(val), tok_line, start, False))
                    break
                continue
            if ch == "#":
                # At the start of a word: a comment to the end of the line. Inside a word: the
                # rest of that word is dropped (the lexer forgets the comment once it returns).
                comment = True
            if comment:
                continue
            if not val:
                start, tok_line = i - 1, line
                if ch == '"':
                    quoted = True
                    continue
            val.append(ch)


class _ParseError(ValueError):
    def __init__(self, token: Token | None, message: str) -> None:
        where = f"line {token.line}: " if token is not None else "end of file: "
        super().__init__(f"the Corefile does not parse: {where}{message}")


@dataclass(slots=True)
class _Directive:
    name: Token
    args: list[str]  # the words after the name on its line, up to a "{" (RemainingArgs)


@dataclass(slots=True)
class _Block:
    keys: list[str]
    braced: bool = False
    directives: list[_Directive] = field(default_factory=list)
    # The "}" that ends the block; None when it runs to the end of the file: a block without
    # braces, or one never closed that CoreDNS still accepts because its last word is a "}".
    close: Token | None = None


class _Parser:
    """The block structure of ``caddyfile.parser``, on our tokens, cursor for cursor.

    ``import`` of a snippet defined in the Corefile is expanded as CoreDNS does. ``import`` of a
    file is read as importing nothing: those files live in the CoreDNS pods, not here (and our
    own import, a glob of rewrite lines, adds no structure).
    """

    def __init__(self, tokens: list[Token]) -> None:
        self.tokens = list(tokens)
        self.cursor = -1
        self.snippets: dict[str, list[Token]] = {}
        self.expansions = 0

    # -- caddyfile.Dispenser ------------------------------------------------------------------

    def next(self) -> bool:
        if self.cursor < len(self.tokens) - 1:
            self.cursor += 1
            return True
        return False

    def next_arg(self) -> bool:
        if self.cursor < 0:
            self.cursor += 1
            return True
        if self.cursor >= len(self.tokens):
            return False
        if (
            self.cursor < len(self.tokens) - 1
            and self.tokens[self.cursor].last_line == self.tokens[self.cursor + 1].line
        ):
            self.cursor += 1
            return True
        return False

    def val(self) -> str:
        if 0 <= self.cursor < len(self.tokens):
            return self.tokens[self.cursor].text
        return ""

    def token(self) -> Token | None:
        if 0 <= self.cursor < len(self.tokens):
            return self.tokens[self.cursor]
        return None

    def is_new_line(self) -> bool:
        if self.cursor < 1:
            return True
        if self.cursor > len(self.tokens) - 1:
            return False
        return self.tokens[self.cursor - 1].last_line < self.tokens[self.cursor].line

    def error(self, message: str) -> _ParseError:
        return _ParseError(self.token(), message)

    # -- caddyfile.parser ---------------------------------------------------------------------

    def parse_all(self) -> list[_Block]:
        blocks = []
        while self.next():
            block = self.parse_one()
            if block is not None and block.keys:
                blocks.append(block)
        return blocks

    def parse_one(self) -> _Block | None:
        keys, eof = self.addresses()
        if eof:
            return _Block(keys)
        if len(keys) == 1 and keys[0].startswith("(") and keys[0].endswith(")"):
            name = keys[0][1:].removesuffix(")")
            if name in self.snippets:
                raise self.error(f"redeclaration of previously declared snippet {name}")
            tokens = self.snippet_tokens()
            for before, tok, arg in zip([None, *tokens], tokens, tokens[1:], strict=False):
                at_line_start = before is None or before.line != tok.line
                if tok.text == "import" and at_line_start and arg.text == name:
                    raise self.error(f"snippet {name} imports itself")
            self.snippets[name] = tokens
            return None
        return self.block_contents(keys)

    def addresses(self) -> tuple[list[str], bool]:
        keys: list[str] = []
        expecting_another = False
        while True:
            tkn = self.val()
            if tkn == "import" and self.is_new_line():
                self.do_import()
                continue
            if tkn == "{":
                if expecting_another:
                    raise self.error("expected another address but had '{'")
                return keys, False
            if tkn:
                expecting_another = tkn.endswith(",")
                keys.append(tkn.removesuffix(","))
            has_next = self.next()
            if expecting_another and not has_next:
                raise self.error("unexpected end of file after ','")
            if not has_next:
                return keys, True
            if not expecting_another and self.is_new_line():
                return keys, False

    def block_contents(self, keys: list[str]) -> _Block:
        braced = self.val() == "{"
        if not braced:
            self.cursor -= 1  # single-server configs need no braces
        block = _Block(keys, braced)
        ended = self.directives(block)
        if braced and self.val() != "}":
            raise self.error("expected '}' to close the server block")
        block.close = ended
        return block

    def directives(self, block: _Block) -> Token | None:
        """Read the block's directives; the "}" that ends them, or None at the end of file."""
        while self.next():
            tok = self.token()
            assert tok is not None
            if tok.text == "}":
                return tok
            if tok.text == "import":
                pattern = self.do_import()
                block.directives.append(_Directive(tok, [pattern]))
                self.cursor -= 1
                continue
            block.directives.append(self.directive())
        return None

    def directive(self) -> _Directive:
        name = self.token()
        assert name is not None
        args: list[str] = []
        in_args = True
        nesting = 0
        while self.next():
            tkn = self.val()
            if tkn == "{":
                nesting += 1
                in_args = False
            elif self.is_new_line() and nesting == 0:
                self.cursor -= 1
                break
            elif tkn == "}" and nesting > 0:
                nesting -= 1
            elif tkn == "}":
                raise self.error("unexpected '}' because no matching opening brace")
            elif tkn == "import" and self.is_new_line():
                self.do_import()
                self.cursor -= 1
                continue
            if in_args and nesting == 0:
                args.append(tkn)
        if nesting > 0:
            raise self.error("unexpected end of file: a '{' is never closed")
        return _Directive(name, args)

    def do_import(self) -> str:
        """Splice ``import X`` out (and a snippet's words in); the cursor ends on its place."""
        if not self.next_arg():
            raise self.error("import needs an argument")
        pattern = self.val()
        if not pattern:
            raise self.error("import requires a non-empty filepath")
        if self.next_arg():
            raise self.error("import takes only one argument")
        self.expansions += 1
        if self.expansions > _MAX_EXPANSIONS:
            raise self.error("too many imports")
        # Copies: words spliced in from a snippet are not where the Corefile's text has them.
        imported = [replace(t) for t in self.snippets.get(pattern, [])]
        self.tokens[self.cursor - 1 : self.cursor + 1] = imported
        self.cursor -= 1
        return pattern

    def snippet_tokens(self) -> list[Token]:
        if self.val() != "{":
            raise self.error("expected '{' to open the snippet")
        count = 1
        tokens: list[Token] = []
        while self.next():
            tkn = self.val()
            if tkn == "}":
                count -= 1
                if count == 0:
                    break
            if tkn == "{":
                count += 1
            tok = self.token()
            assert tok is not None
            tokens.append(tok)
        if count != 0:
            raise self.error("expected '}' to close the snippet")
        return tokens


def _zone(name: str, *, key: bool = False) -> str:
    """A zone as CoreDNS compares it: lower case, no scheme, no trailing dot (nor, for a
    server block key, its port)."""
    name = name.lower()
    if "://" in name:
        name = name.split("://", 1)[1]
    if key and ":" in name:
        name = name.rpartition(":")[0]
    return name.rstrip(".") or "."


def _serves(block: _Block, directive: _Directive, cluster_domain: str) -> bool:
    if directive.name.text != "kubernetes":
        return False
    # Without zone arguments the plugin serves the server block's zones.
    if directive.args:
        zones = {_zone(z) for z in directive.args}
    else:
        zones = {_zone(k, key=True) for k in block.keys}
    return _zone(cluster_domain) in zones


def _cluster_block(tokens: list[Token], cluster_domain: str) -> _Block | None:
    """The first server block whose ``kubernetes`` plugin serves the domain (or None).

    Raises ValueError (a _ParseError) when CoreDNS would refuse the Corefile's structure.
    """
    for block in _Parser(tokens).parse_all():
        if any(_serves(block, d, cluster_domain) for d in block.directives):
            return block
    return None


def _import_path(import_line: str) -> str:
    words = tokenize(import_line)
    if len(words) != 2 or words[0].text != "import" or words[0].quoted:
        raise ValueError(f"{import_line!r} is not one import directive with one argument")
    return words[1].text


def _status(block: _Block, path: str | None) -> CorefileCheck:
    names = [d.name.text for d in block.directives]
    return CorefileCheck(
        has_import=path is not None
        and any(d.name.text == "import" and d.args == [path] for d in block.directives),
        has_reload="reload" in names,
        server_block_found=True,
    )


def check(corefile: str, import_line: str, cluster_domain: str) -> CorefileCheck:
    """Whether the cluster domain's server block has our import and a ``reload``.

    A Corefile CoreDNS would refuse, or one where no block serves the domain, reports
    ``server_block_found=False``; ensure_import says why.
    """
    try:
        block = _cluster_block(tokenize(corefile), cluster_domain)
    except ValueError:
        return CorefileCheck(False, False, False)
    if block is None:
        return CorefileCheck(False, False, False)
    try:
        path: str | None = _import_path(import_line)
    except ValueError:
        path = None
    return _status(block, path)


def _line_start(corefile: str, offset: int) -> int:
    return corefile.rfind("\n", 0, offset) + 1


def _indent(corefile: str, block: _Block, originals: set[int]) -> str:
    """The indentation of the block's first directive that starts its own line."""
    for d in block.directives:
        if id(d.name) not in originals:
            continue  # expanded from a snippet
        prefix = corefile[_line_start(corefile, d.name.start) : d.name.start]
        if prefix.strip(" \t") == "":
            return prefix
    return "    "


def ensure_import(corefile: str, import_line: str, cluster_domain: str) -> str:
    """The Corefile with ``import_line`` and ``reload`` present in the cluster's server block.

    Returns the input unchanged when both are there; raises ValueError when no server block
    serves the cluster domain, when CoreDNS would refuse the Corefile as it is, or when the
    edit would change anything but the inserted lines (nothing is guessed).
    """
    path = _import_path(import_line)
    tokens = tokenize(corefile)
    block = _cluster_block(tokens, cluster_domain)
    if block is None:
        raise ValueError(f"no server block with 'kubernetes {cluster_domain}' in the Corefile")
    status = _status(block, path)
    if status.ok:
        return corefile
    originals = {id(t) for t in tokens}
    if block.braced and block.close is None:
        # Its last plugin's "}" ends the file; any line after it would be a parse error.
        raise ValueError("the cluster domain's server block is never closed")
    if block.close is not None and id(block.close) not in originals:
        raise ValueError("the cluster domain's server block ends inside an imported snippet")

    # At the start of the line of the block's "}"; at the end for a block that runs to the end.
    at = len(corefile) if block.close is None else _line_start(corefile, block.close.start)
    eol_at = corefile.rfind("\n", 0, at)
    newline = "\r\n" if eol_at > 0 and corefile[eol_at - 1] == "\r" else "\n"
    indent = _indent(corefile, block, originals)
    lines = []
    if not status.has_import:
        lines.append(f"{indent}{import_line.strip()}{newline}")
    if not status.has_reload:
        lines.append(f"{indent}{RELOAD_LINE}{newline}")
    lead = newline if at == len(corefile) and corefile and not corefile.endswith("\n") else ""
    added = lead + "".join(lines)
    updated = corefile[:at] + added + corefile[at:]
    _verify(corefile, at, added, updated, import_line, cluster_domain)
    return updated


def _verify(
    corefile: str, at: int, added: str, updated: str, import_line: str, cluster_domain: str
) -> None:
    """Refuse an edit CoreDNS would read as anything but the old words plus the new lines."""
    first_line = corefile.count("\n", 0, at) + 1
    shift = added.count("\n")
    old = tokenize(corefile)
    expected = (
        [(t.text, t.line) for t in old if t.start < at]
        + [(t.text, t.line + first_line - 1) for t in tokenize(added)]
        + [(t.text, t.line + shift) for t in old if t.start >= at]
    )
    if [(t.text, t.line) for t in tokenize(updated)] != expected:
        raise ValueError("adding the lines would change how CoreDNS reads the Corefile")
    if not check(updated, import_line, cluster_domain).ok:
        raise ValueError("the Corefile still lacks the lines after adding them")
