"""/docs and /redoc load every asset from this server: they work on a host with no internet access."""

from __future__ import annotations

import re

import pytest


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_use_only_local_assets(client, page):
    response = client.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assets = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", response.text)
    assets += re.findall(r"""url:\s*["']([^"']+)["']""", response.text)  # the OpenAPI document Swagger UI fetches
    assert assets, response.text
    for asset in assets:
        assert asset.startswith("/") and not asset.startswith("//"), f"{page} loads {asset} from elsewhere"
        assert client.get(asset).status_code == 200, asset
