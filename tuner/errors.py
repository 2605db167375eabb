"""User-facing errors: one line naming the file, line and field; the CLI exits 2 on them."""

from __future__ import annotations


class InputError(Exception):
    """Bad input from the user (trace, YAML, option). Printed as one line, exit code 2."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.file = file
        self.line = line
        self.field = field

    def __str__(self) -> str:
        where = ""
        if self.file is not None:
            where = str(self.file)
            if self.line is not None:
                where += f":{self.line}"
            where += ": "
        field = f"field '{self.field}': " if self.field else ""
        return _one_line(f"{where}{field}{self.message}")


def _one_line(text: str) -> str:
    """Control characters (a newline in a quoted value, say) shown escaped, so the error stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
