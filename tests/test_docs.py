"""The API contract ships with the package's repository: docs/API.md is the project's shared/API.md."""
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "API.md")


@pytest.mark.skipif(not os.path.exists(SHARED), reason="the project's shared/API.md is not beside this clone")
def test_docs_api_is_the_shared_contract():
    with open(os.path.join(ROOT, "docs", "API.md"), encoding="utf-8") as ours, open(SHARED, encoding="utf-8") as theirs:
        assert ours.read() == theirs.read(), "docs/API.md differs from ../shared/API.md: copy the contract again"
