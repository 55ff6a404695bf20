"""No password reaches the console or a log, whoever writes the message: vitray's own
lines, other libraries' log records and warnings, an uncaught exception's traceback, and the
output of the workers of a local Ray (forwarded to the console, kept in session logs)."""

import subprocess
import sys
import textwrap

import pytest

from jobs.secrets import redact

PASSWORD = "S3cr3t-pw"
URL = f"http://alice:{PASSWORD}@127.0.0.1:5000/api/2.0/mlflow"


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )


def test_redact_masks_the_password_of_every_uri():
    text = f"{URL} and s3://key:{PASSWORD}@bucket/x, not https://host/a:b@c"
    assert PASSWORD not in redact(text) and redact(URL) == URL.replace(PASSWORD, "***")
    # a password holding an unencoded @ (urllib reads it whole), and a token as user
    assert redact("http://alice:p@ss@host:5000/x") == "http://alice:***@host:5000/x"
    assert redact("GET https://t0ken@host/api failed") == "GET https://***@host/api failed"
    compact = '{"uri":"http://host:5000","user":"a@b.c"}'  # no userinfo: left alone
    assert redact(compact) == compact


def test_an_error_quoting_a_credential_is_raised_again_masked():
    from jobs.secrets import masked_errors

    def fails():
        try:
            raise OSError("connection refused")
        except OSError as e:
            raise ValueError(f"API request to {URL} failed") from e

    with pytest.raises(RuntimeError) as raised, masked_errors():
        fails()
    text = str(raised.value)
    assert PASSWORD not in text and "alice:***@" in text
    assert "ValueError" in text and "OSError: connection refused" in text  # the whole story
    assert raised.value.__cause__ is None and raised.value.__suppress_context__

    plain = KeyError("no password here")
    with pytest.raises(KeyError) as raised, masked_errors():
        raise plain
    assert raised.value is plain  # nothing to mask: the error as it was


def test_every_writer_in_the_process_is_masked():
    proc = run_python(
        f"""
        import logging, warnings
        from jobs.secrets import mask_process_output
        mask_process_output()
        logging.basicConfig(level=logging.INFO)
        print("vitray line {URL}")
        logging.getLogger("urllib3.connectionpool").warning("Retrying after %s", "{URL}")
        warnings.warn("MLflow at {URL} did not answer")
        try:
            raise OSError("{URL} refused")
        except OSError:
            logging.getLogger("ray.data").exception("Full stack trace:")  # its traceback too
        raise ConnectionError("API request to {URL} failed")
        """
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "ConnectionError: API request to" in out
    assert "Full stack trace:" in out and "OSError: http://alice:***@" in out
    assert PASSWORD not in out and out.count("alice:***@") == 5


@pytest.mark.ray
def test_local_ray_workers_mask_what_they_print_and_log():
    proc = run_python(
        f"""
        import glob, os, traceback, ray
        from jobs.secrets import mask_process_output
        from jobs.cluster.raynode import ensure_ray
        mask_process_output()
        ensure_ray()

        @ray.remote(num_cpus=0.1)
        def leak():
            print("task prints {URL}")
            try:
                raise ConnectionError("cannot reach {URL}")
            except ConnectionError:
                traceback.print_exc()

        ray.get(leak.remote())
        logs = ray._private.worker._global_node.get_logs_dir_path()
        ray.shutdown()
        files = [f for f in glob.glob(logs + "/*") if os.path.isfile(f)]
        leaked = [f for f in files if "{PASSWORD}" in open(f, errors="ignore").read()]
        print("logs with it:", leaked)
        """
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-2000:]
    assert "task prints http://alice:***@" in out and "ConnectionError: cannot reach" in out
    assert "logs with it: []" in out and PASSWORD not in out
