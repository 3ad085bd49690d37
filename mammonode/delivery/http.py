"""The one HTTP client of outbound POSTs (STOW-RS results, webhook notifications)."""

from __future__ import annotations

import urllib.request


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Never follow a redirect: urllib would re-send the request (its bearer token, or a
    webhook body that may hold PHI) to whatever origin the Location names, turning a POST
    into a GET for 301-303. A redirect is a failed attempt: not delivered."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # urllib then raises HTTPError with the redirect's code


OPENER = urllib.request.build_opener(_NoRedirect)
