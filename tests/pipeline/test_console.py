"""The progress line: redrawn in place on a terminal, plain lines in a log."""

import io

from pipeline.console import ConsoleLine


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_one_line_redrawn_and_kept_lines_end_with_a_newline():
    out = Terminal()
    line = ConsoleLine(out)
    line.show("step 1")
    line.show("step 2")
    line.show("step 3 val", keep=True)
    line.show("step 4")
    line.close()
    assert out.getvalue() == "\rstep 1\x1b[K\rstep 2\x1b[K\rstep 3 val\x1b[K\n\rstep 4\x1b[K\n"


def test_a_log_gets_plain_lines_at_most_every_interval_and_every_kept_line():
    out = io.StringIO()
    line = ConsoleLine(out, every_s=3600)
    line.show("step 1")
    line.show("step 2")  # within the interval: left out of the log
    line.show("step 3 val", keep=True)
    line.close()
    assert out.getvalue() == "step 1\nstep 3 val\n"
    assert "\r" not in out.getvalue()
