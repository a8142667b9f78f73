"""`genseg schema --asyncapi` is a valid AsyncAPI 3.0 document for the official parser.

The check runs ``tests/asyncapi/validate.mjs`` (``@asyncapi/parser``, pinned in
tests/asyncapi/package.json) under node. ``make test`` installs it; when node or the
package is missing these tests fail, never skip: the document must be checked.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from schemas import Topics
from schemas.export import asyncapi_document

CHECKER_DIR = Path(__file__).parent / "asyncapi"
SCRIPT = CHECKER_DIR / "validate.mjs"
PARSER_PACKAGE = CHECKER_DIR / "node_modules" / "@asyncapi" / "parser" / "package.json"
INSTALL_HINT = "run `make test` (it installs tests/asyncapi with `npm ci`)"


@dataclass(frozen=True)
class Verdict:
    """What the official parser said: its exit status and its error diagnostics."""

    returncode: int
    errors: list[dict[str, str]]


def node() -> str:
    """The node executable; fails the test (with what to do) when the checker cannot run."""
    found = shutil.which("node")
    if found is None:
        pytest.fail(f"node is not on PATH: install Node.js 18+ and npm, then {INSTALL_HINT}")
    if not PARSER_PACKAGE.is_file():
        pytest.fail(f"@asyncapi/parser is not installed in {CHECKER_DIR}: {INSTALL_HINT}")
    return found


def validate(document: dict[str, Any]) -> Verdict:
    """Run the official parser on ``document`` (given on stdin)."""
    result = subprocess.run(
        [node(), str(SCRIPT)],
        input=json.dumps(document),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=CHECKER_DIR,
    )
    assert result.returncode in (0, 1), f"validate.mjs failed: {result.stderr[-2000:]}"
    return Verdict(result.returncode, json.loads(result.stdout))


def test_the_pinned_parser_is_installed() -> None:
    node()
    wanted = json.loads((CHECKER_DIR / "package.json").read_text())["dependencies"]
    installed = json.loads(PARSER_PACKAGE.read_text())["version"]
    assert wanted["@asyncapi/parser"] == installed, f"stale tests/asyncapi: {INSTALL_HINT}"
    assert installed.startswith("3.")


@pytest.mark.parametrize("prefix", ["genseg", "acme-staging"])
def test_asyncapi_document_has_no_errors(prefix: str) -> None:
    verdict = validate(asyncapi_document(Topics(prefix)))
    assert verdict.errors == []
    assert verdict.returncode == 0


def test_a_broken_document_is_reported() -> None:
    # The mistake this check was added for: the Kafka key bound to a channel, not a message.
    document = copy.deepcopy(asyncapi_document())
    document["channels"]["prompts"]["bindings"] = {"kafka": {"key": {"type": "string"}}}
    del document["info"]["version"]
    verdict = validate(document)
    assert verdict.returncode == 1
    paths = {error["path"] for error in verdict.errors}
    assert "channels.prompts.bindings.kafka.key" in paths
    assert any(path.startswith("info") for path in paths), paths


def test_a_dangling_reference_is_reported() -> None:
    document = copy.deepcopy(asyncapi_document())
    message = next(iter(document["channels"]["images"]["messages"].values()))
    message["$ref"] = "#/components/messages/no_such_message"
    verdict = validate(document)
    assert verdict.returncode == 1
    assert verdict.errors, "a $ref to nothing must be an error"
