"""The job progress display: a tqdm bar on a terminal, plain lines otherwise, nothing when quiet."""

import io

from raas_batch.data.progress import JobProgress


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_terminal_bar_counts_rows_and_tokens():
    stream = _Tty()
    p = JobProgress(total_rows=10, initial_rows=4, stream=stream)
    assert p.is_bar
    p.update(num_new_tokens=50, num_finished_rows=0)
    p.update(num_new_tokens=30, num_finished_rows=2)
    p.advance_to(8)
    p.advance_to(7)  # never backwards
    p.update(0, 100)  # never past the total
    assert (p.rows, p.tokens) == (10, 80)
    p.close()
    text = stream.getvalue()
    assert "10/10" in text and "tok/s" in text and "row" in text


def test_plain_lines_when_not_a_terminal():
    stream = io.StringIO()
    p = JobProgress(total_rows=4, stream=stream, log_interval_s=0.0)
    assert not p.is_bar
    p.update(10, 1)
    p.log("shard 1/2 done")
    p.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("[raas_batch] 1/4 rows (25.0%)") and "tok/s" in lines[0] and "ETA" in lines[0]
    assert lines[1] == "[raas_batch] shard 1/2 done"
    assert "1/4 rows" in lines[-1]


def test_quiet_prints_nothing():
    stream = _Tty()
    p = JobProgress(total_rows=3, stream=stream, quiet=True, log_interval_s=0.0)
    p.update(5, 3)
    p.log("hello")
    p.close()
    assert stream.getvalue() == ""
    assert p.eta_s() == 0.0
