"""`/docs` that renders without internet: Swagger UI from a pinned package, not a CDN.

FastAPI's own `/docs` page loads Swagger UI's script and style from cdn.jsdelivr.net, so
on a machine without internet (an air-gapped cluster, a laptop offline) it stays blank.
`swagger-ui-bundle-v2` ships the same assets as package data; they are served here, under
`/docs/assets/`, by the service itself.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse

DOCS_URL = "/docs"
ASSETS_URL = "/docs/assets"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"


def mount_docs(app: FastAPI) -> None:
    """Serve Swagger UI for `app`'s OpenAPI document at `/docs`, assets included.

    The app must be built with `docs_url=None` (and `redoc_url=None`: ReDoc, too, comes
    from a CDN), so that FastAPI does not add its CDN page at the same path.
    """
    from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
    from starlette.staticfiles import StaticFiles
    from swagger_ui_bundle import swagger_ui_path

    app.mount(ASSETS_URL, StaticFiles(directory=str(swagger_ui_path)), name="swagger-ui")

    @app.get(DOCS_URL, include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        # Behind a proxy that strips a path prefix, every URL the page loads keeps it.
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/favicon-32x32.png",
            oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT_URL}",
        )

    @app.get(OAUTH2_REDIRECT_URL, include_in_schema=False)
    async def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()
